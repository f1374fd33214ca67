"""The original design's HTTP API (`POST /analyze`, `GET /jobs/<id>`, `GET /health`): a second door into the daemon.

It runs in the daemon process on threads of its own and never touches MLX: an upload is streamed into Mondrian's
spool (`var/spool/`), queued as a ledger job through daemon/ledger.py, analysed by the one worker thread like an
inbox photo, and its report answered as the original `/analyze` did. Modules: `guard` (who may call), `upload`
(the multipart stream into the spool), `spool` (its folders and their sweep), `answers` (jobs as HTTP answers),
`app` (the routes), `server` (uvicorn on its thread, started and stopped by the supervisor).
"""
