#!/bin/bash
# On the device, from the repository root: take whichever chunks (.stage1/, .stage2/, ... built by
# build_payload.sh) this call carried, keep them in /tmp/epkit-stage, and extract every archive whose
# parts have all arrived into /tmp/site and /tmp/model. Idempotent: an archive is extracted once; a
# chunk of another build (another manifest.txt) wipes the staged state and /tmp/site, /tmp/model first.
# Prints what is still missing; the last line is "staged: complete" once everything is in place.
set -euo pipefail
STAGE=${STAGE:-/tmp/epkit-stage}
T0=$(date +%s)
shopt -s nullglob
chunks=(.stage[0-9]*/)
[ ${#chunks[@]} -gt 0 ] || [ -f "$STAGE/manifest.txt" ] || { echo "unpack: no .stageN/ folder here and nothing staged" >&2; exit 1; }
for chunk in "${chunks[@]}"; do
  [ -f "$chunk/manifest.txt" ] || { echo "unpack: $chunk has no manifest.txt" >&2; exit 1; }
  if [ -f "$STAGE/manifest.txt" ] && ! cmp -s "$chunk/manifest.txt" "$STAGE/manifest.txt"; then
    echo "unpack: $chunk belongs to another build; clearing $STAGE, /tmp/site, /tmp/model"
    rm -rf "$STAGE" /tmp/site /tmp/model
  fi
  mkdir -p "$STAGE/parts" "$STAGE/done"
  cp "$chunk/manifest.txt" "$STAGE/manifest.txt"
  for f in "$chunk"*; do
    name=$(basename "$f")
    [ "$name" = manifest.txt ] && continue
    archive=${name%.part[0-9][0-9]}
    [ -e "$STAGE/done/$archive" ] || cp "$f" "$STAGE/parts/$name"
  done
done
missing=()
while read -r archive nparts digest mib; do
  [ -e "$STAGE/done/$archive" ] && continue
  if [ "$nparts" = 1 ]; then
    parts=("$STAGE/parts/$archive")
  else
    parts=()
    for ((i = 0; i < nparts; i++)); do parts+=("$STAGE/parts/$archive.part$(printf %02d "$i")"); done
  fi
  complete=1
  for p in "${parts[@]}"; do [ -f "$p" ] || complete=0; done
  if [ $complete = 0 ]; then missing+=("$archive ($mib MiB)"); continue; fi
  got=$(cat "${parts[@]}" | sha256sum | cut -d' ' -f1)
  [ "$got" = "$digest" ] || { echo "unpack: $archive: sha256 $got, manifest says $digest" >&2; exit 1; }
  cat "${parts[@]}" | xz -dc | tar -x -C /tmp
  touch "$STAGE/done/$archive"
  rm -f "${parts[@]}"
  echo "unpack: extracted $archive ($mib MiB)"
done < "$STAGE/manifest.txt"
echo "unpack: $(( $(date +%s) - T0 )) s; /tmp/site $(du -sm /tmp/site 2>/dev/null | cut -f1) MiB"
if [ ${#missing[@]} -gt 0 ]; then
  echo "staged: waiting for ${#missing[@]} archive(s): ${missing[*]}"
else
  touch "$STAGE/complete"
  echo "staged: complete"
fi
