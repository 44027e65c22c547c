#!/usr/bin/env bash
# A side environment with PathML 3.0.8, for bench/pipeline.py's side-by-side runs:
#   bash bench/pathml_venv.sh [VENV]        (default bench/.cache/pathml-venv; about 2.2 GB, a minute or two)
#   python bench/pipeline.py --pathml-python bench/.cache/pathml-venv/bin/python
# PathML pins torch 2.12.0 and numpy < 2, which cannot live beside histoflow's environment. Here torch is the
# machine's 2.13.0 CPU wheel instead (pinned by a constraints file so that nothing pulls a CUDA build), and
# openslide-python 1.4.0 instead of 1.3.1 (1.3.1 does not find the library of the openslide-bin wheel; the
# call PathML makes, open_slide, is the same). Every other requirement is PathML's own pin or range;
# python-javabridge builds from source with the JDK (JAVA_HOME from javac).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
VENV=${1:-$HERE/.cache/pathml-venv}
PY=${PYTHON:-python3.11}
if [ -z "${JAVA_HOME:-}" ]; then
  command -v javac >/dev/null || { echo "pathml_venv.sh: python-javabridge needs a JDK (javac not found)" >&2; exit 1; }
  JAVA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v javac)")")")
  export JAVA_HOME
fi
C=$(mktemp)
trap 'rm -f "$C"' EXIT
echo 'torch==2.13.0' > "$C"
"$PY" -m venv "$VENV"
P="$VENV/bin/pip"
"$P" install -q --upgrade pip setuptools wheel
"$P" install -q -c "$C" torch==2.13.0
"$P" install -q -c "$C" --no-deps pathml==3.0.8
"$P" install -q -c "$C" \
  'numpy<2,>=1.26.4' 'pandas<=2.1.4' 'scipy<2,>=1.12' 'scikit-image<=0.22.0' statsmodels 'matplotlib>=3.8.0' \
  'openslide-python==1.4.0' openslide-bin \
  'pydicom==3.0.2' 'h5py==3.10.0' scikit-learn 'dask[distributed]' 'anndata<=0.10.3,>=0.7.6' 'scanpy==1.9.6' \
  'opencv-contrib-python==4.8.1.78' 'loguru==0.7.2' 'networkx<=3.2.1' 'torch-geometric==2.8.0' \
  'onnx==1.22.0' 'onnxruntime<1.18,>=1.17.0' 'jpype1>=1.5.0' 'tqdm==4.66.3' 'onnxscript==0.7.1' \
  'python-javabridge==4.0.4' 'python-bioformats==4.1.0'
"$VENV/bin/python" -c "import pathml.core, pathml.preprocessing, torch; print('PathML', __import__('pathml').__version__, 'torch', torch.__version__)"
