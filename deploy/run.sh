#!/usr/bin/env bash
# A production deployment as plain processes on one machine (no container engine):
# gunicorn behind your TLS proxy, Celery workers by queue — `default` (imports, Label Studio
# sync), `refit` (the seconds-long refits and embeddings readers wait for), `train`
# (pretraining, fine-tuning, distillation: put that one on a GPU host) — and Celery beat.
#
#   deploy/run.sh start | stop | status
#
# Configuration comes from the environment (README "Production"): at least DEBUG=0,
# SECRET_KEY, DEID_SALT, ALLOWED_HOSTS, DATABASE_URL (PostgreSQL), CELERY_BROKER_URL
# (Redis; also CACHE_URL unless set), MEDIA_ROOT / ARTIFACTS_ROOT / INCOMING_ROOT on storage every process shares.
# RUN_DIR holds pid files and logs (default var/run). PORT (8000), WEB_WORKERS (4).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
RUN_DIR=${RUN_DIR:-var/run}
PORT=${PORT:-8000}
mkdir -p "$RUN_DIR"

: "${DATABASE_URL:?set DATABASE_URL (postgres://...)}"
: "${CELERY_BROKER_URL:?set CELERY_BROKER_URL (redis://...)}"
# the API's per-user limit is counted in one place for every web process (README "Production")
case "$CELERY_BROKER_URL" in
  redis://*|rediss://*) export CACHE_URL=${CACHE_URL:-$CELERY_BROKER_URL} ;;
esac

start_one() {  # name, command...
  local name=$1; shift
  if [ -f "$RUN_DIR/$name.pid" ] && kill -0 "$(cat "$RUN_DIR/$name.pid")" 2>/dev/null; then
    echo "$name already running (pid $(cat "$RUN_DIR/$name.pid"))"; return
  fi
  nohup "$@" >>"$RUN_DIR/$name.log" 2>&1 &
  echo $! >"$RUN_DIR/$name.pid"
  echo "$name started (pid $!, log $RUN_DIR/$name.log)"
}

case "${1:-}" in
  start)
    "$PY" manage.py migrate --noinput
    "$PY" manage.py collectstatic --noinput >/dev/null
    "$PY" manage.py check --deploy --fail-level WARNING
    start_one web "$PY" -m gunicorn medsite.wsgi -b "127.0.0.1:$PORT" -w "${WEB_WORKERS:-4}" \
      --threads 4 --timeout 120 --access-logfile -
    start_one worker-default "$PY" -m celery -A medsite worker -Q default -c 2 -n "default@%h" \
      --loglevel INFO
    start_one worker-refit "$PY" -m celery -A medsite worker -Q refit -c 1 -n "refit@%h" \
      --loglevel INFO
    start_one worker-train "$PY" -m celery -A medsite worker -Q train -c 1 -n "train@%h" \
      --loglevel INFO
    start_one beat "$PY" -m celery -A medsite beat --loglevel INFO \
      --schedule "$RUN_DIR/celerybeat-schedule"
    ;;
  stop)
    for name in beat worker-train worker-refit worker-default web; do
      if [ -f "$RUN_DIR/$name.pid" ]; then
        kill "$(cat "$RUN_DIR/$name.pid")" 2>/dev/null || true
        rm -f "$RUN_DIR/$name.pid"
        echo "$name stopped"
      fi
    done
    ;;
  status)
    for name in web worker-default worker-refit worker-train beat; do
      if [ -f "$RUN_DIR/$name.pid" ] && kill -0 "$(cat "$RUN_DIR/$name.pid")" 2>/dev/null; then
        echo "$name running (pid $(cat "$RUN_DIR/$name.pid"))"
      else
        echo "$name not running"
      fi
    done
    ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
