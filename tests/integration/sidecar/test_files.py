"""Uploads, listings, downloads (traversal-proof), deletes, and generated-file detection."""

from __future__ import annotations

import os

import httpx
import pytest
import trio

from tests.support.sidecar import read_to_eof, running_sidecar


async def test_upload_list_download_delete() -> None:
    async with running_sidecar("py", "--max-file-size-mb", "1") as sc, \
            httpx.AsyncClient(base_url=sc.url, timeout=30) as client:
        files = [("files", ("data.csv", b"a,b\n1,2\n", "text/csv")),
                 ("files", ("../../evil name.txt", b"hello", "text/plain")),
                 ("files", (".hidden", b"x", "text/plain"))]
        resp = await client.post("/files", files=files)
        assert resp.status_code == 200
        body = resp.json()
        assert [u["name"] for u in body["uploaded"]] == ["data.csv", "evil name.txt"]
        assert body["uploaded"][0] == {"name": "data.csv", "path": "data.csv", "size": 8, "mime_type": "text/csv"}
        assert body["skipped"] == [".hidden"]
        assert sorted(os.listdir(sc.working_dir)) == ["data.csv", "evil name.txt"]
        # the field name `file` (singular) works too
        resp = await client.post("/files", files=[("file", ("one.txt", b"1", "text/plain"))])
        assert resp.json()["uploaded"][0]["name"] == "one.txt"

        listing = (await client.get("/files")).json()["files"]
        assert {f["name"]: f["size"] for f in listing} == {"data.csv": 8, "evil name.txt": 5, "one.txt": 1}

        resp = await client.get("/files/evil%20name.txt")
        assert resp.status_code == 200 and resp.content == b"hello"
        assert (await client.delete("/files/one.txt")).json() == {"deleted": "one.txt"}
        assert (await client.get("/files/one.txt")).status_code == 404
        assert (await client.delete("/files/one.txt")).status_code == 404

        # Size limit: 413, and nothing half-written is left behind.
        resp = await client.post("/files", files=[("files", ("big.bin", b"x" * (1024 * 1024 + 1)))])
        assert resp.status_code == 413
        assert sorted(os.listdir(sc.working_dir)) == ["data.csv", "evil name.txt"]


async def raw_get(port: int, path: str) -> tuple[int, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = await read_to_eof(stream)
    return int(data.split(b" ", 2)[1]), data


@pytest.mark.parametrize("path", [
    "/files/..%2F..%2F..%2Fetc%2Fpasswd", "/files/%2Fetc%2Fpasswd", "/files/../../etc/passwd",
    "/files/..", "/files/.", "/files/link_out", "/files/subdir", "/files/a%00b",
])
async def test_download_cannot_escape_the_working_dir(path: str) -> None:
    async with running_sidecar("py") as sc, httpx.AsyncClient(base_url=sc.url, timeout=30) as client:
        code = "import os\nos.symlink('/etc/passwd', 'link_out')\nos.mkdir('subdir')\nprint('ok')"
        res = (await client.post("/execute", json={"code": code, "timeout": 10})).json()
        assert res["stdout"] == "ok\n"
        # the symlink and the directory are neither generated files nor listed
        assert res["generated"] == []
        assert [f["name"] for f in (await client.get("/files")).json()["files"]] == ["code.py"]
        status, raw = await raw_get(sc.port, path)  # exactly these bytes: no client-side normalising
        assert status in (404, 400), raw
        assert b"root:" not in raw and b"location:" not in raw.lower()


async def test_index_html_is_served_not_redirected() -> None:
    async with running_sidecar("py") as sc, httpx.AsyncClient(base_url=sc.url, timeout=30) as client:
        await client.post("/execute", json={"code": "open('index.html','w').write('<p>hi</p>')", "timeout": 10})
        resp = await client.get("/files/index.html")
        assert resp.status_code == 200 and resp.content == b"<p>hi</p>"
        assert resp.headers["content-type"] == "text/html"


async def test_generated_files_created_and_modified_only() -> None:
    async with running_sidecar("py") as sc, httpx.AsyncClient(base_url=sc.url, timeout=30) as client:
        upload = [("files", ("input.csv", b"1\n2\n")), ("files", ("append.txt", b"start\n")),
                  ("files", ("untouched.txt", b"same"))]
        assert (await client.post("/files", files=upload)).status_code == 200
        code = ("open('append.txt', 'a').write('more\\n')\n"
                "print(open('input.csv').read().split())\n"
                "open('untouched.txt').read()\n"
                "open('new.json', 'w').write('{}')\n")
        res = (await client.post("/execute", json={"code": code, "timeout": 10})).json()
        assert res["exit_code"] == 0, res["stderr"]
        assert res["generated"] == [
            {"name": "append.txt", "size": 11, "mime_type": "text/plain"},
            {"name": "new.json", "size": 2, "mime_type": "application/json"},
        ]


@pytest.mark.slow
async def test_java_generated_files_exclude_class_files() -> None:
    async with running_sidecar("java") as sc, httpx.AsyncClient(base_url=sc.url, timeout=120) as client:
        code = ('import java.nio.file.*;\npublic class Code {\n  public static void main(String[] a) throws Exception {\n'
                '    Files.writeString(Path.of("out.txt"), "from java");\n    System.out.println("ok");\n  }\n}\n')
        res = (await client.post("/execute", json={"code": code, "timeout": 60})).json()
        assert res["exit_code"] == 0 and res["stdout"] == "ok\n", res["stderr"]
        assert res["generated"] == [{"name": "out.txt", "size": 9, "mime_type": "text/plain"}]
        assert "Code.class" not in os.listdir(sc.working_dir)


# The program file is rewritten in place between runs when it is a plain file the sidecar made
# (program_file.write). Whatever a run leaves under that name must not be written through.
PLANTED = {
    "symlink": "os.symlink('target.txt', 'code.py')",
    "hardlink": "os.link('target.txt', 'code.py')",
    "fifo": "os.mkfifo('code.py')",
    "directory": "os.mkdir('code.py')",
}


@pytest.mark.parametrize("kind", sorted(PLANTED))
async def test_a_planted_program_file_is_replaced_not_written_through(kind: str) -> None:
    async with running_sidecar("py") as sc, httpx.AsyncClient(base_url=sc.url, timeout=30) as client:
        code = ("import os\nopen('target.txt', 'w').write('TARGET')\nos.unlink('code.py')\n"
                f"{PLANTED[kind]}\nprint('planted')")
        res = (await client.post("/execute", json={"code": code, "timeout": 10})).json()
        assert res["stdout"] == "planted\n", res
        for _ in range(2):  # the second run takes the in-place path on the replacement
            res = (await client.post("/execute", json={"code": "print('next')", "timeout": 10})).json()
            assert res["stdout"] == "next\n" and res["exit_code"] == 0, res
        assert (await client.get("/files/target.txt")).content == b"TARGET"
        assert os.path.isfile(os.path.join(sc.working_dir, "code.py"))
        assert not os.path.islink(os.path.join(sc.working_dir, "code.py"))


async def test_program_file_rewritten_in_place_is_exact() -> None:
    """Shorter code after longer code (truncation), and a file the run made read-only."""
    async with running_sidecar("py") as sc, httpx.AsyncClient(base_url=sc.url, timeout=30) as client:
        long = "print('long')  # " + "x" * 5000 + "\nimport os\nos.chmod('code.py', 0o400)"
        res = (await client.post("/execute", json={"code": long, "timeout": 10})).json()
        assert res["stdout"] == "long\n", res
        for code, out in (("print(1)", "1\n"), ("print(22)", "22\n"), ("print(3)", "3\n")):
            res = (await client.post("/execute", json={"code": code, "timeout": 10})).json()
            assert res["stdout"] == out and res["stderr"] == "", res
        with open(os.path.join(sc.working_dir, "code.py"), "rb") as fh:
            assert fh.read() == b"print(3)"


async def test_upload_answered_before_the_chunked_terminator_keeps_the_connection() -> None:
    """The API streams uploads chunked and reuses the connection for ``/execute``. The sidecar
    answers at the multipart closing boundary; the terminator that follows must not cost the
    connection (it did: the next request met a reset, reported as a sandbox failure)."""
    async with running_sidecar("py") as sc:
        stream = await trio.open_tcp_stream("127.0.0.1", sc.port)
        async with stream:
            part = (b"--b0\r\nContent-Disposition: form-data; name=\"files\"; filename=\"in.txt\"\r\n"
                    b"Content-Type: text/plain\r\n\r\nDATA\r\n--b0--\r\n")
            await stream.send_all(b"POST /files HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                                  b"Content-Type: multipart/form-data; boundary=b0\r\n\r\n"
                                  + b"%x\r\n%s\r\n" % (len(part), part))
            got = b""
            with trio.fail_after(10):
                while b'"uploaded"' not in got or not got.endswith(b"}"):
                    got += await stream.receive_some(65536)
            assert got.startswith(b"HTTP/1.1 200 ") and b'"in.txt"' in got
            code = b'{"code": "print(open(\'in.txt\').read())", "timeout": 10}'
            await stream.send_all(b"0\r\n\r\nPOST /execute HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                  b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(code), code))
            data = await read_to_eof(stream, timeout=30)
    assert data.startswith(b"HTTP/1.1 200 ") and b'"stdout":"DATA\\n"' in data.replace(b": ", b":")
