"""``rlsedit serve``: an OpenAI-compatible server over a live, editable state.

Layout (one concept per module):

* :mod:`.protocol`   request/response models mirroring OpenAI's schema; the error object.
* :mod:`.auth`       bearer tokens from a file, scopes ``query`` and ``edit``.
* :mod:`.rwlock`     the readers–writer lock between forward passes and weight writes.
* :mod:`.live`       the query-side model copy and its weight version.
* :mod:`.decode`     batched, left-padded, KV-cached decoding of rows with their own sampling.
* :mod:`.scheduler`  dynamic batching of concurrent queries into shared decode waves.
* :mod:`.catalog`    the live and undone edits of the state, for paging.
* :mod:`.editqueue`  the one thread that owns the session: edits, undos, status.
* :mod:`.bodylimit`  refuses bodies over a size limit (413) before any parsing.
* :mod:`.app`        the FastAPI application and its routes.
* :mod:`.cli`        the ``serve`` subcommand.

FastAPI and uvicorn are an optional extra (``pip install rlsedit[serve]``); only
:mod:`.app`, :mod:`.auth`, :mod:`.protocol` and :mod:`.cli` import them.
"""
