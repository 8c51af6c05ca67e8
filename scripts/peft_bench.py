"""LoRA training steps with PyTorch + transformers + PEFT, the reference
`pipeline bench train --compare-peft` measures itself against (the binary
embeds this file and runs it with the Python of scripts/install-torch.sh).

It trains what `bench train` trains: LoRA r=16, alpha=32, dropout 0.05 on
q,k,v,o,gate,up,down, batch 1, AdamW (lr 1e-4, no weight decay), clipping at 1.0,
on the same token ids in the same order (the `--examples` file: the first
example is the warm-up step, the rest are measured). The loss is
transformers' own: labels -100 where the loss mask is 0, logits at every
position, as a user's PEFT script computes it. `--precision bf16` runs the
forward pass under `torch.autocast("cpu", torch.bfloat16)`, PyTorch's mixed
precision on CPUs.

Prints one JSON line: {"tokens_per_s", "peak_rss_bytes", "steps",
"mean_tokens", "seconds_per_step", "versions"}.
"""

import argparse
import json
import os
import resource
import sys
import time

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", required=True, help="an HF model directory or a .gguf file")
parser.add_argument("--examples", required=True, help='JSON file (- for stdin): [{"input_ids": [...], "loss_mask": [...]}, ...]')
parser.add_argument("--threads", type=int, default=os.cpu_count())
parser.add_argument("--precision", choices=["f32", "bf16"], default="f32")
parser.add_argument("--gradient-checkpointing", action="store_true")
args = parser.parse_args()

# The examples first: the caller writes them before it reads what this
# script prints.
if args.examples == "-":
    examples = json.load(sys.stdin)
else:
    with open(args.examples) as f:
        examples = json.load(f)

torch.set_num_threads(args.threads)
torch.manual_seed(0)
if args.model.endswith(".gguf"):
    directory, name = os.path.split(os.path.abspath(args.model))
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
else:
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
if args.gradient_checkpointing:
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=targets))
model.train()
trainable = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)

tokens, seconds = 0, 0.0
for step, example in enumerate(examples):
    ids = torch.tensor([example["input_ids"]])
    labels = ids.clone()
    labels[0, torch.tensor(example["loss_mask"]) == 0] = -100
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
        loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - start
    if step > 0:  # the first step warms up
        tokens += ids.shape[1]
        seconds += elapsed
    print(f"peft step {step}: {ids.shape[1]} tokens, loss {loss.item():.4f}, {elapsed:.1f} s", file=sys.stderr)

measured = len(examples) - 1
print(
    json.dumps(
        {
            "tokens_per_s": tokens / seconds,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "steps": measured,
            "mean_tokens": tokens / measured,
            "seconds_per_step": seconds / measured,
            "versions": f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}",
        }
    )
)
