#!/usr/bin/env bash
# The peer libraries the benchmarks compare with (benchmark dependencies, never runtime ones),
# into the project's virtual environment, without letting them move torch, numpy or transformers:
# - mosaicml-streaming 0.13 pins numpy<2.2 and transformers<5, neither of which its MDS reader
#   needs, so it goes in with --no-deps and the few libraries its reader imports;
# - litdata would pull torchvision (a CUDA build; it does not load on CPU torch) for image features;
#   streaming.vision imports it too, so data_peers.py skips that subpackage;
# - s3torchconnector installs as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
install_package "[test]"
pip_q() { python -m pip install -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
pip_q --no-deps "mosaicml-streaming==0.13.0" "litdata==0.2.76"
pip_q "xxhash>=3,<4" "zstd>=1.5" "Brotli>=1.0.9" "python-snappy>=0.6" "catalogue>=2" "lightning-utilities>=0.11" \
      "obstore>=0.4" "filelock" "s3torchconnector==1.5.0"
# streaming/__init__ imports streaming.vision (torchvision): stand it in, as data_peers.py does.
python -c "
import sys, types
sys.modules['streaming.vision'] = types.ModuleType('streaming.vision')
import streaming, litdata, s3torchconnector
print('peers:', streaming.__version__, litdata.__version__, s3torchconnector.__version__)"
