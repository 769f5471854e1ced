"""What every process pays before it does any ML: ``manage.py check`` and a web worker.

    python -m bench.import_cost [--repeats 3] [--pages 20] [--out bench/results/import_cost.json]

1. ``manage.py check`` — wall time and peak memory (max RSS) of the whole process, the median
   of ``--repeats`` runs (each a fresh interpreter, as a cron job or a deploy hook runs it).
2. A web worker that serves no inference: a throwaway SQLite project (the fixture brain MRI
   pool, no model), ``gunicorn medsite.wsgi`` with one sync worker, a logged-in client that
   opens the project list, the project page, the worklist's label page, the reports and the
   admin ``--pages`` times; then the worker's resident memory (VmRSS) and whether it mapped
   libtorch (``/proc/<pid>/maps``) — a worker that never runs a model should not load it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._server import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[1]


def _env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CELERY_BROKER_URL")}
    env.update(DATABASE_URL=f"sqlite:///{tmp / 'db.sqlite3'}", MEDIA_ROOT=str(tmp / "media"),
               ARTIFACTS_ROOT=str(tmp / "artifacts"))
    return env


def check_cost(env: dict, repeats: int) -> dict:
    walls, rss = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        started = time.perf_counter()
        subprocess.run([sys.executable, "manage.py", "check"], cwd=ROOT, env=env, check=True,
                       capture_output=True)
        walls.append(time.perf_counter() - started)
        # ru_maxrss of children is the max over all waited-for children: read it after each
        rss.append(max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, before))
    return {"wall_s": round(statistics.median(walls), 2), "walls_s": [round(w, 2) for w in walls],
            "max_rss_mb": round(max(rss) / 1024, 1)}


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def worker_cost(env: dict, pages: int) -> dict:
    import requests

    manage = [sys.executable, "manage.py"]
    subprocess.run(manage + ["migrate", "--noinput"], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    subprocess.run(manage + ["import_scans", "--project", "bench", "--create-project",
                             "--no-progress", str(ROOT / "fixtures" / "brain_mri" / "pool")],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    setup = (
        "from django.contrib.auth.models import User\n"
        "from annotator.models import Project\n"
        "User.objects.create_superuser('bench', 'b@example.org', 'bench-pass-1')\n"
        "print(Project.objects.get(name='bench').pk)\n")
    out = subprocess.run(manage + ["shell", "-c", setup], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True).stdout
    project_id = int(out.strip().splitlines()[-1])
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "gunicorn", "medsite.wsgi", "-b",
                               f"127.0.0.1:{port}", "-w", "1", "--timeout", "120"],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, 120)
        base = f"http://127.0.0.1:{port}"
        session = requests.Session()
        login = session.get(f"{base}/accounts/login/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', login.text).group(1)
        session.post(f"{base}/accounts/login/", data={
            "username": "bench", "password": "bench-pass-1", "csrfmiddlewaretoken": token},
            headers={"Referer": f"{base}/accounts/login/"})
        urls = ["/", f"/projects/{project_id}/", f"/projects/{project_id}/next/",
                f"/projects/{project_id}/reports/", "/admin/", "/admin/annotator/scan/"]
        statuses = {}
        for _ in range(pages):
            for url in urls:
                response = session.get(base + url)
                statuses[url] = response.status_code
        time.sleep(1)
        workers = _children(server.pid)
        pid = workers[0] if workers else server.pid
        status = Path(f"/proc/{pid}/status").read_text()
        rss_kb = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))
        maps = Path(f"/proc/{pid}/maps").read_text()
        return {"worker_rss_mb": round(rss_kb / 1024, 1), "libtorch_loaded": "libtorch" in maps,
                "pages": statuses, "requests": pages * len(urls)}
    finally:
        server.terminate()
        server.wait(30)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pages", type=int, default=20)
    parser.add_argument("--label", default="", help="a note stored with the result")
    parser.add_argument("--out", default="bench/results/import_cost.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        env = _env(Path(tmp))
        result = {"label": args.label, "check": check_cost(env, args.repeats),
                  "web_worker": worker_cost(env, args.pages)}
    result["command"] = "python -m bench.import_cost " + " ".join(argv or sys.argv[1:])
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
