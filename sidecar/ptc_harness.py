# Programmatic tool calling: the in-sandbox runtime for Python programs.
#
# The sidecar prepends this file's text to every PTC program (``sidecar/ptc_program.py``), followed
# by one ``async def`` stub per tool and the user's code wrapped in ``async def __user_main__()``
# (contract §2.4: top-level ``await``, keyword arguments, decoded JSON results, errors raise).
#
# The builder puts ``_KCR_CHANNEL_NAME = '.kcr-ptc-<random>'`` above this text: each run has its own
# directory, so the clean-up of a finished run can never touch the next one's.
#
# Why a channel and not replay: the process stays alive while the client runs the tools, so the code
# before a call never runs twice. Calls travel through files plus FIFO "doorbells" in the hidden
# directory ``.kcr-ptc`` of the working directory, which the sidecar creates before the run:
#
#   request:  write ``q.<id>`` (JSON ``{"reply": "r.py", "calls": [{"name", "input"}, ...]}``), then
#             one line ``<id>\n`` into the FIFO ``in`` (one small write: atomic between writers);
#   answer:   the sidecar writes ``a.<id>`` (``{"results": [{"result", "is_error", "error_message"}]}``)
#             and one line ``<id>\n`` into our reply FIFO ``r.py``, which we hold open read-write
#             (so the sidecar's non-blocking open always finds a reader) and watch from the loop.
#
# Batching: every call made in the same event-loop turn (``asyncio.gather``) goes out as one request;
# the flush waits until no other task is ready to run, so the sidecar hands all of them to the client
# in one ``tool_call_required``. Names start with ``_kcr`` so tool stubs cannot shadow them.
import asyncio as _kcr_asyncio
import json as _kcr_json
import os as _kcr_os


class ToolExecutionError(Exception):
    """Raised inside the program when the client reports a tool call as failed (``is_error``)."""


class _KcrChannel:
    def __init__(self, directory):
        self.dir = directory
        self.seq = 0
        self.batch = []
        self.waiting = {}
        self.scheduled = False
        self.doorbell = None
        self.reply = None
        self.buffer = b""

    def _open(self, loop):
        if self.doorbell is not None:
            return
        path = _kcr_os.path.join(self.dir, "r.py")
        if not _kcr_os.path.exists(path):
            _kcr_os.mkfifo(path, 0o600)
        self.reply = _kcr_os.open(path, _kcr_os.O_RDWR | _kcr_os.O_NONBLOCK)
        self.doorbell = _kcr_os.open(_kcr_os.path.join(self.dir, "in"), _kcr_os.O_WRONLY)
        loop.add_reader(self.reply, self._on_reply)

    async def call(self, name, payload):
        encoded = _kcr_json.dumps(payload)  # a value that is not JSON fails here, at the call
        loop = _kcr_asyncio.get_running_loop()
        future = loop.create_future()
        self.batch.append((name, encoded, future))
        if not self.scheduled:
            self.scheduled = True
            loop.call_soon(self._flush, loop, 0)
        reply = await future
        if reply.get("is_error"):
            raise ToolExecutionError(reply.get("error_message") or "tool execution failed")
        return reply.get("result")

    def _flush(self, loop, rounds):
        ready = getattr(loop, "_ready", None)  # other tasks about to run may call tools too
        if ready and rounds < 200:
            loop.call_soon(self._flush, loop, rounds + 1)
            return
        self.scheduled = False
        batch, self.batch = self.batch, []
        if not batch:
            return
        self._open(loop)
        self.seq += 1
        ident = f"p{self.seq}"
        calls = ",".join(f'{{"name":{_kcr_json.dumps(n)},"input":{e}}}' for n, e, _ in batch)
        tmp = _kcr_os.path.join(self.dir, "t." + ident)
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(f'{{"reply":"r.py","calls":[{calls}]}}')
        _kcr_os.rename(tmp, _kcr_os.path.join(self.dir, "q." + ident))
        self.waiting[ident] = [f for _, _, f in batch]
        _kcr_os.write(self.doorbell, (ident + "\n").encode())

    def _on_reply(self):
        try:
            self.buffer += _kcr_os.read(self.reply, 4096)
        except BlockingIOError:
            return
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            ident = line.decode().strip()
            futures = self.waiting.pop(ident, None)
            if futures is None:
                continue
            path = _kcr_os.path.join(self.dir, "a." + ident)
            with open(path, encoding="utf-8") as handle:
                results = _kcr_json.load(handle)["results"]
            _kcr_os.unlink(path)
            for future, reply in zip(futures, results):
                if not future.done():
                    future.set_result(reply)


_kcr_channel = _KcrChannel(_kcr_os.path.join(_kcr_os.getcwd(), _KCR_CHANNEL_NAME))  # noqa: F821 (set by the builder)


def _kcr_args(named, extra):
    named = {k: v for k, v in named.items() if v is not None}
    named.update({k: v for k, v in extra.items() if v is not None})
    return named


def _kcr_main(main):
    _kcr_asyncio.run(main())
