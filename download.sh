#!/usr/bin/env bash
# COCO 2014 train/val images and caption annotations, into ./data (about 19 GB of zips).
# Interrupted downloads resume; a damaged zip is reported and left for a re-run, not extracted.
set -euo pipefail
mkdir -p data
cd data
for url in http://images.cocodataset.org/zips/train2014.zip \
           http://images.cocodataset.org/zips/val2014.zip \
           http://images.cocodataset.org/annotations/annotations_trainval2014.zip; do
    zip=$(basename "$url")
    if command -v wget >/dev/null; then wget -c "$url"; else curl -L -C - -O "$url"; fi
    if ! unzip -tq "$zip" >/dev/null; then
        echo "error: $zip is incomplete or damaged; run download.sh again to resume it" >&2
        exit 1
    fi
    unzip -q -n "$zip"
done
echo "COCO 2014 is in data/: train2014/, val2014/, annotations/"
