#!/usr/bin/env bash
# COCO 2014 train/val images and caption annotations, into ./data (about 19 GB of zips).
# Interrupted downloads resume; a damaged zip is reported and left for a re-run, not extracted.
# Without internet here: fetch the three zips elsewhere, put them in data/, and run this again to unzip them.
set -euo pipefail
mkdir -p data
cd data
for url in http://images.cocodataset.org/zips/train2014.zip \
           http://images.cocodataset.org/zips/val2014.zip \
           http://images.cocodataset.org/annotations/annotations_trainval2014.zip; do
    zip=$(basename "$url")
    if ! { [ -f "$zip" ] && unzip -tq "$zip" >/dev/null 2>&1; }; then  # not already here and complete
        if command -v wget >/dev/null; then
            reachable() { wget -q --spider "$url" 2>/dev/null; }
            fetch() { wget -c "$url"; }
        else
            reachable() { curl -sfIL "$url" >/dev/null 2>&1; }
            fetch() { curl -L -C - -O "$url"; }
        fi
        if ! reachable; then
            echo "error: cannot reach $url: the download needs internet. Fetch train2014.zip, val2014.zip and" \
                 "annotations_trainval2014.zip elsewhere, put them in $(pwd)/, and run download.sh again to unzip them" >&2
            exit 1
        fi
        fetch
        if ! unzip -tq "$zip" >/dev/null; then
            echo "error: $zip is incomplete or damaged; run download.sh again to resume it" >&2
            exit 1
        fi
    fi
    unzip -q -n "$zip"
done
echo "COCO 2014 is in data/: train2014/, val2014/, annotations/"
