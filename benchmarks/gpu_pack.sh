#!/usr/bin/env bash
# Pack what gpu_session.sh has written so far (figures, metrics, logs; no weights, data or caches)
# into one archive: bash benchmarks/gpu_pack.sh RUN_DIR ARCHIVE.tgz
set -uo pipefail
R=$1; ARCHIVE=$2
cd "$R" || exit 1
find . \( -path ./AD_NC -o -name 'checkpoint-*' -o -name latent_cache -o -name feature_net -o -path '*/logs/unet' \
          -o -path '*/logs/vqmodel' \) -prune -o -type f \
       \( -name '*.json' -o -name '*.jsonl' -o -name '*.md' -o -name '*.csv' -o -name '*.log' -o -name '*.gif' \
          -o -name '*.png' \) ! -name 'sample-*.png' -print0 | tar czf "$ARCHIVE.part" --null -T - && mv "$ARCHIVE.part" "$ARCHIVE"
ls -la "$ARCHIVE"
