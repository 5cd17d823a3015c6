#!/usr/bin/env bash
# Image entrypoint: load the Ascend CANN environment when the image has it, then run the command.
# (A platform that replaces the entrypoint still works: examples/qwen3/common.sh does the same.)
for f in /usr/local/Ascend/ascend-toolkit/set_env.sh /usr/local/Ascend/nnal/atb/set_env.sh; do
  # Vendor scripts: sourced without -e/-u, which they were not written for.
  # shellcheck source=/dev/null
  if [ -f "$f" ]; then source "$f"; fi
done
exec "$@"
