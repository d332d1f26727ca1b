"""`shared`: the small package every notebook of the course imports.

One module per concept, read top to bottom by learners:

- `utils`       seeding, device choice, library versions
- `tokenizers`  char, word+char, byte, BPE and regex BPE (GPT-2 / GPT-4 patterns) tokenizers
- `attention`   scaled dot-product and multi-head attention (GQA, RoPE, window, KV cache)
- `model`       `GPTConfig` and `GPT` with GPT-2 parameter names
- `moe`         a top-k routed mixture-of-experts feed-forward layer (capacity, balancing loss)
- `sampling`    greedy / temperature / top-k / top-p sampling, streaming, beam search
- `data`        the Shakespeare corpus, datasets view, next-token batches, packing
- `train`       the training loop: AdamW, warmup + cosine, clipping, accumulation,
                evaluation, checkpoints with exact resume, DDP under torchrun
- `evaluation`  loss over a token stream, perplexity, bits per byte, BLEU, ROUGE,
                harness-style multiple-choice scoring
- `hf`          conversion to and from Hugging Face `transformers`
- `tinyworld`   a seeded synthetic world: facts, biographies, tasks, preference pairs,
                the chat template, a rule reader of its sentences (weeks 4-8)
- `chat`        SFT rows packed with the reply-only loss mask, chat generation with tools,
                exact-match evaluation per task family
- `align`       reply log-probs, a reward model, Bradley-Terry and DPO losses, GRPO advantages,
                PPO's KL estimates, GAE and clipped loss
- `structured`  JSON Schemas, constrained decoding that only writes valid JSON, tool dispatch
- `agent`       a ReAct loop over tools (bracket calls, errors as observations, step limits),
                the tiny world's agent tasks and their gold traces
- `guardrails`  normalisation, injection/jailbreak and unsafe-content rules, PII redaction
- `retrieval`   chunking, MiniLM embeddings, FAISS / brute-force search, BM25, reciprocal
                rank fusion, MaxSim reranking, recall@k and MRR
- `lora`        LoRA layers injected into the course GPT, merged and saved
- `zoo`         trained course models, built from seeded recipes and cached
- `engine`      continuous batching: many requests, one batched decode step at a time
- `serve`       an OpenAI-compatible HTTP server (FastAPI) on the engine, `python -m shared.serve`
- `plotting`    loss curves and attention heatmaps

Imports are explicit everywhere (`from shared.model import GPT, GPTConfig`).
"""

__version__ = "0.1.0"

# The course's home; the notebooks' Colab set-up cell and the README badges read it from here.
REPO_URL = "https://github.com/llm-course/llm-course"
