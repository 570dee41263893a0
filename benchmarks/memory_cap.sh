#!/usr/bin/env bash
# memory_cap.sh GB FOLDER COMMAND...: run COMMAND inside a memory cgroup capped at GB (a whole number of
# 10^9 bytes; swap capped too, so an over-cap run is killed rather than swapped), with cgroup v2 or v1's
# memory controller, where this user may make one (root). FOLDER's files (the model the command maps)
# are first evicted from the page cache, so that every page the run maps is charged to its cgroup:
# pages cached by an earlier process stay charged to that one's. Over the cap, the kernel first takes
# back clean file-backed pages (memory-mapped weights), then kills the command (exit 137).
# Prints the cap and the cgroup's peak usage to stderr. Exit 3: no capped cgroup can be made here.
set -uo pipefail
gb=$1 folder=$2
shift 2
fail() { echo "memory_cap: $*" >&2; exit 3; }
[[ $gb =~ ^[0-9]+$ ]] && [ "$gb" -gt 0 ] || fail "the cap must be a whole number of GB, not '$gb'"
bytes=$((gb * 1000000000))
if grep -qw memory /sys/fs/cgroup/cgroup.controllers 2>/dev/null && [ -w /sys/fs/cgroup ]; then
  # v2: a child gets memory.max only where its parent delegates the controller
  grep -qw memory /sys/fs/cgroup/cgroup.subtree_control || echo +memory > /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null
  cg=/sys/fs/cgroup/editreward-cap-$$ limit=memory.max swap=memory.swap.max swap_value=0 peak=memory.peak
elif [ -w /sys/fs/cgroup/memory ]; then
  cg=/sys/fs/cgroup/memory/editreward-cap-$$ limit=memory.limit_in_bytes swap=memory.memsw.limit_in_bytes
  swap_value=$bytes peak=memory.max_usage_in_bytes
else
  fail "no memory cgroup can be made here (needs root and a memory controller)"
fi
mkdir "$cg" 2>/dev/null || fail "cannot make $cg"
trap 'rmdir "$cg" 2>/dev/null' EXIT
{ echo "$bytes" > "$cg/$limit" && [ "$(cat "$cg/$limit")" -le "$bytes" ]; } 2>/dev/null \
  || fail "cannot cap $cg at $gb GB (the memory controller is not delegated here)"
# Swap: v2 has its own cap (0: none); v1's memsw counts memory and swap together. Absent without swap accounting.
[ ! -e "$cg/$swap" ] || echo "$swap_value" > "$cg/$swap" 2>/dev/null || fail "cannot cap swap in $cg"
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
sh -c 'echo $$ > "$1/cgroup.procs" || exit 3; shift; exec "$@"' sh "$cg" "$@"
status=$?
[ -r "$cg/$peak" ] && used=$(awk '{printf "%.2f GB", $1 / 1e9}' "$cg/$peak") || used="not reported by this kernel"
echo "memory_cap: cap $gb GB, cgroup peak $used, exit $status" >&2
exit $status
