# The two commands the README opens with. Each bootstraps .venv itself (a no-op when it is current).
PY := .venv/bin/python

.PHONY: demo summary test lint typecheck unit bootstrap clean

bootstrap:
	@scripts/bootstrap.sh

demo: bootstrap
	.venv/bin/supermoe-rec train --config configs/ml100k.yaml

summary: bootstrap
	.venv/bin/supermoe-rec data summary --config configs/ml100k.yaml

test: bootstrap lint typecheck unit

lint:
	.venv/bin/ruff check supermoe_rec tests examples benchmarks scripts
	.venv/bin/ruff format --check supermoe_rec tests examples benchmarks scripts

typecheck:
	.venv/bin/mypy supermoe_rec

unit:
	$(PY) -m pytest

clean:
	rm -rf .venv .mypy_cache .pytest_cache .ruff_cache
