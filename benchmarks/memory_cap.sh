#!/usr/bin/env bash
# memory_cap.sh GB FOLDER COMMAND...: run COMMAND inside a memory cgroup capped at GB (10^9 bytes), with
# cgroup v2 or v1's memory controller, where this user may make one (root). FOLDER's files (the model
# the command maps) are first evicted from the page cache, so that every page the run maps is charged
# to its cgroup: pages cached by an earlier process stay charged to that one's. Over the cap, the kernel
# first takes back clean file-backed pages (memory-mapped weights), then kills the command (exit 137).
# Prints the cgroup's peak usage to stderr. Exit 3: no cgroup can be made here.
set -uo pipefail
gb=$1 folder=$2
shift 2
if grep -qw memory /sys/fs/cgroup/cgroup.controllers 2>/dev/null && [ -w /sys/fs/cgroup ]; then
  cg=/sys/fs/cgroup/editreward-cap-$$ limit=memory.max peak=memory.peak
elif [ -w /sys/fs/cgroup/memory ]; then
  cg=/sys/fs/cgroup/memory/editreward-cap-$$ limit=memory.limit_in_bytes peak=memory.max_usage_in_bytes
else
  echo "memory_cap: no memory cgroup can be made here (needs root and a memory controller)" >&2
  exit 3
fi
mkdir "$cg" || exit 3
trap 'rmdir "$cg" 2>/dev/null' EXIT
echo $((gb * 1000000000)) > "$cg/$limit"
python3 - "$folder" <<'PY'
import os, sys
folder = sys.argv[1]
for name in os.listdir(folder):
    path = os.path.join(folder, name)
    if os.path.isfile(path):
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
PY
sh -c 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"' sh "$cg" "$@"
status=$?
echo "memory_cap: cap $gb GB, cgroup peak $(awk '{printf "%.2f", $1 / 1e9}' "$cg/$peak") GB, exit $status" >&2
exit $status
