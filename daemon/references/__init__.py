"""An advisor's reference portfolio: the curator sidecar (one parser, used by training too), the indexer, its
watcher and the thumbnails."""
