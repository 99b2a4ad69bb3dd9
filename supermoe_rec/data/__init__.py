"""Data: MovieLens readers and fetch, the ml-mt protocol, bring-your-own schemas, batches and loaders."""
