//! lora-train: exact resume after a kill, PEFT's adapter layout, gradients
//! against finite differences, and training mistakes.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use common::{Project, chat_jsonl, models_dir, tiny_gemma3, train_recipe};
use pipeline_model::lora::{Lora, LoraLinear, NoDropout, frozen_linear};

const TRAIN: &str = "rank = 4\nalpha = 8\ndropout = 0.1\nlearning_rate = 5e-3\nmax_steps = 6\n\
                     gradient_accumulation = 2\ncheckpoint_every = 2\neval_every = 3\nschedule = \"cosine\"\nwarmup_steps = 1\n";

fn setup(models: &Path) -> Project {
    let p = Project::new();
    tiny_gemma3(models, &p.path("tiny"), 4096);
    p.write("data/train.jsonl", &chat_jsonl(12));
    p.write("r.toml", &train_recipe(&p.path("tiny"), TRAIN));
    p
}

fn entry(p: &Project, stage: &str) -> std::path::PathBuf {
    let out = p.run(&["show", "r.toml", stage]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().into()
}

/// `trainer_state.json` without its wall-clock fields, as text.
fn trainer_state_without_clocks(dir: &Path) -> String {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(o) => {
                o.retain(|k, _| {
                    !(k.contains("runtime") || k.contains("per_second") || k == "time" || k == "timestamp")
                });
                o.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("trainer_state.json")).unwrap()).unwrap();
    strip(&mut v);
    serde_json::to_string_pretty(&v).unwrap()
}

#[test]
fn a_killed_training_resumes_to_byte_identical_results() {
    let Some(models) = models_dir() else { return };
    // f32, gradient checkpointing, and bf16 frozen weights: each resumed run
    // must end where the uninterrupted one does, on the same CPU.
    for (variant, extra) in
        [("f32", ""), ("gradient checkpointing", "gradient_checkpointing = true\n"), ("bf16", "precision = \"bf16\"\n")]
    {
        let setup = |models: &Path| {
            let p = setup(models);
            p.write("r.toml", &train_recipe(&p.path("tiny"), &format!("{TRAIN}{extra}")));
            p
        };
        let reference = setup(&models);
        reference.ok(&["run", "r.toml"]);
        let want = entry(&reference, "train");
        let want_adapter = std::fs::read(want.join("adapter_model.safetensors")).unwrap();
        let want_log = std::fs::read_to_string(want.join("loss.csv")).unwrap();
        let want_state = trainer_state_without_clocks(&want);
        assert_eq!(want_log.lines().count(), 7, "{want_log}");

        // Killed after step 3 (checkpoint at 2), and between checkpoint writes.
        for (fault, resume_step) in [("lora-train.step-3", Some(2)), ("lora-train.mid-checkpoint", None)] {
            let p = setup(&models);
            let out = p.cmd(&["run", "r.toml"]).env("PIPELINE_FAULT", fault).output().unwrap();
            assert!(!out.status.success(), "{variant}, {fault}: the run should have been killed");
            let plan = p.run(&["plan", "r.toml", "--json"]);
            let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
            let train = &plan["stages"][3];
            match resume_step {
                Some(step) => {
                    assert_eq!(train["status"], "resume", "{variant}, {fault}: {train}");
                    assert_eq!(train["step"], step);
                }
                None => assert_eq!(
                    train["status"], "run",
                    "{variant}, {fault}: a partial checkpoint is not resumed from: {train}"
                ),
            }
            let stderr = p.ok(&["run", "r.toml"]);
            assert!(stderr.contains("ran     train"), "{stderr}");
            let got = entry(&p, "train");
            assert!(
                std::fs::read(got.join("adapter_model.safetensors")).unwrap() == want_adapter,
                "{variant}, {fault}: adapter differs"
            );
            assert_eq!(
                std::fs::read_to_string(got.join("loss.csv")).unwrap(),
                want_log,
                "{variant}, {fault}: loss log"
            );
            assert_eq!(
                trainer_state_without_clocks(&got),
                want_state,
                "{variant}, {fault}: trainer_state.json (wall-clock fields aside)"
            );
            let m: serde_json::Value =
                serde_json::from_slice(&std::fs::read(got.join("manifest.json")).unwrap()).unwrap();
            assert_eq!(m["metrics"]["resumed_from_step"], serde_json::json!(resume_step), "{variant}, {fault}");
        }
        eprintln!("resume ({variant}): adapter, loss.csv and trainer_state.json equal the uninterrupted run's");
    }
}

/// Resumed on another kind of CPU (here: the same machine with the kernels
/// capped to their portable paths, `PIPELINE_MAX_CPU_ISA=portable`): in f32
/// our kernels' paths compute the same bits, so the adapter is the same;
/// with bf16 frozen weights, a CPU without native bf16 products continues
/// on the widening path (f32 activations instead of bf16-rounded ones), so
/// the steps after the checkpoint differ: close, not the same bytes.
#[test]
fn a_training_resumed_on_another_cpu_kind_continues_from_the_same_checkpoint() {
    let Some(models) = models_dir() else { return };
    for (variant, extra) in [("f32", ""), ("bf16", "precision = \"bf16\"\n")] {
        resumed_on_portable_kernels(&models, variant, extra);
    }
}

fn resumed_on_portable_kernels(models: &Path, variant: &str, extra: &str) {
    let setup = |models: &Path| {
        let p = setup(models);
        p.write("r.toml", &train_recipe(&p.path("tiny"), &format!("{TRAIN}{extra}")));
        p
    };
    let reference = setup(models);
    reference.ok(&["run", "r.toml"]);
    let want = entry(&reference, "train");
    let p = setup(models);
    let out = p.cmd(&["run", "r.toml"]).env("PIPELINE_FAULT", "lora-train.step-3").output().unwrap();
    assert!(!out.status.success(), "the run should have been killed");
    let out = p.cmd(&["run", "r.toml"]).env("PIPELINE_MAX_CPU_ISA", "portable").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = entry(&p, "train");
    let (want_log, got_log) = (
        std::fs::read_to_string(want.join("loss.csv")).unwrap(),
        std::fs::read_to_string(got.join("loss.csv")).unwrap(),
    );
    let rows = |s: &str| s.lines().map(str::to_string).collect::<Vec<_>>();
    assert_eq!(rows(&got_log)[..3], rows(&want_log)[..3], "the header and the steps before the checkpoint");
    let load = |d: &Path| candle_core::safetensors::load(d.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let (a, b) = (load(&want), load(&got));
    let (mut worst, mut largest) = (0f32, 0f32);
    for (name, t) in &a {
        let (x, y) = (
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b[name].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        for (u, v) in x.iter().zip(&y) {
            worst = worst.max((u - v).abs());
            largest = largest.max(u.abs());
        }
    }
    let same = std::fs::read(want.join("adapter_model.safetensors")).unwrap()
        == std::fs::read(got.join("adapter_model.safetensors")).unwrap();
    eprintln!(
        "{variant}, resumed with the portable kernels: adapter {} the uninterrupted run's (largest difference {worst:.2e}, \
         largest value {largest:.2e})",
        if same { "equals" } else { "differs from" }
    );
    if variant == "f32" {
        assert!(same, "f32: our kernels' paths should compute the same bits (largest difference {worst:.2e})");
    }
    assert!(
        worst <= 0.1 * largest,
        "{variant}: the resumed training drifted: {worst:.2e} (largest value {largest:.2e})"
    );
}

/// A few LoRA training steps of the real Gemma 3 270M, dropout 0, against
/// PEFT training the same adapter (our initial A and B, loaded with
/// `PeftModel.from_pretrained(…, is_trainable=True)`) on the same example
/// with `torch.optim.AdamW` and clipping: the losses of every step and the
/// trained adapter agree to float rounding.
#[test]
fn lora_steps_match_peft() {
    let (Some(models), Some(python)) = (models_dir(), common::torch_python()) else { return };
    use pipeline_train::{TokenizedSplit, TrainConfig, Trainer};
    let dir = models.join("gemma-3-270m");
    let files = pipeline_model::ModelFiles::from_dir("google/gemma-3-270m", &dir).unwrap();
    let model = pipeline_model::load(&files, &Device::Cpu, 256).unwrap();
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let prompt = tok
        .encode("<bos><start_of_turn>user\nWhat is the weather in Paris?<end_of_turn>\n<start_of_turn>model\n", false)
        .unwrap()
        .get_ids()
        .to_vec();
    let answer = tok
        .encode(
            "<tool_call>{\"tool_name\": \"get_weather\", \"args\": {\"city\": \"Paris\"}}</tool_call><end_of_turn>",
            false,
        )
        .unwrap()
        .get_ids()
        .to_vec();
    let ids = [prompt.clone(), answer.clone()].concat();
    let mask = [vec![0u8; prompt.len()], vec![1u8; answer.len()]].concat();
    let steps = 4;
    let mut config = TrainConfig {
        max_steps: Some(steps),
        learning_rate: 1e-3,
        weight_decay: 0.01,
        schedule: pipeline_train::optim::Schedule::Constant,
        max_grad_norm: 1.0,
        ..TrainConfig::default()
    };
    config.lora.dropout = 0.0;
    let examples = TokenizedSplit::from_examples([("0".to_string(), ids.clone(), mask.clone())]);
    let mut trainer = Trainer::new(model, examples, None, config).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (init, ours_dir, theirs_dir) = (tmp.path().join("init"), tmp.path().join("ours"), tmp.path().join("theirs"));
    trainer.save_adapter(&init, "google/gemma-3-270m").unwrap();
    trainer.run(None, &mut ()).unwrap();
    trainer.save_adapter(&ours_dir, "google/gemma-3-270m").unwrap();
    let our_losses: Vec<f64> = trainer.state().log.iter().map(|r| r.loss).collect();
    assert_eq!(our_losses.len(), steps);

    let script = r#"
import json, sys, torch, peft
from peft import PeftModel
from transformers import AutoModelForCausalLM
gguf_dir, gguf, init, out, data = sys.argv[1:6]
d = json.loads(data)
torch.set_num_threads(2)
base = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf, dtype=torch.float32)
model = PeftModel.from_pretrained(base, init, is_trainable=True)
model.train()
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=d["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=d["wd"])
ids = torch.tensor([d["ids"]])
labels = ids.clone()
labels[0, torch.tensor(d["mask"]) == 0] = -100
losses = []
for _ in range(d["steps"]):
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step(); opt.zero_grad(set_to_none=True)
    losses.append(loss.item())
model.save_pretrained(out)
print(json.dumps({"losses": losses, "versions": f"torch {torch.__version__}, peft {peft.__version__}"}))
"#;
    let data = serde_json::json!({"ids": ids, "mask": mask, "steps": steps, "lr": 1e-3, "wd": 0.01});
    let out = std::process::Command::new(&python)
        .arg("-c")
        .arg(script)
        .arg(&dir)
        .arg("gemma-3-270m-q4_k_m.gguf")
        .arg(&init)
        .arg(&theirs_dir)
        .arg(data.to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let theirs: serde_json::Value =
        serde_json::from_slice(out.stdout.rsplit(|&b| b == b'\n').find(|l| !l.is_empty()).unwrap()).unwrap();
    let their_losses: Vec<f64> = serde_json::from_value(theirs["losses"].clone()).unwrap();
    let loss_diff = our_losses.iter().zip(&their_losses).map(|(a, b)| (a - b).abs()).fold(0f64, f64::max);
    let load = |d: &Path| candle_core::safetensors::load(d.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let (start, a, b) = (load(&init), load(&ours_dir), load(&theirs_dir));
    assert_eq!(a.len(), b.len(), "the same tensors: {:?}", b.keys().collect::<Vec<_>>());
    // Adam moves every element by about the learning rate whatever its
    // gradient's size, so an element whose gradient is rounding noise (A's,
    // while B is still near 0) may move either way: compare the training's
    // whole update, not single elements.
    let (mut diff, mut update) = (0f64, 0f64);
    for (name, t) in &a {
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (x, y, x0) =
            (flat(t), flat(b.get(name).unwrap_or_else(|| panic!("PEFT has no {name}"))), flat(&start[name]));
        for ((u, v), w) in x.iter().zip(&y).zip(&x0) {
            diff += ((u - v) as f64).powi(2);
            update += ((v - w) as f64).powi(2);
        }
    }
    let relative = (diff / update).sqrt();
    eprintln!(
        "LoRA vs PEFT ({}), {steps} steps of {} tokens, dropout 0: losses ours {our_losses:.5?} / PEFT {their_losses:.5?} \
         (largest difference {loss_diff:.2e}); the adapters' updates differ by {:.2} % (L2, relative to PEFT's)",
        theirs["versions"],
        ids.len(),
        100.0 * relative
    );
    assert!(update > 1e-6, "the steps barely moved the adapter: the comparison would prove little");
    assert!(loss_diff < 2e-3 * their_losses[0], "losses differ from PEFT's by {loss_diff:.2e}");
    assert!(relative < 0.05, "the adapter's update differs from PEFT's by {:.1} %", 100.0 * relative);
}

/// Six AdamW steps with linear warm-up and decay, global-norm clipping and
/// weight decay, against `torch.optim.AdamW`, `clip_grad_norm_` and
/// transformers' `get_linear_schedule_with_warmup` on the same parameters
/// and gradients: the parameters after every step agree to float rounding.
#[test]
fn adamw_clipping_and_schedule_match_pytorch() {
    let Some(python) = common::torch_python() else { return };
    use pipeline_train::optim::{AdamW, Schedule, clip_grad_norm, learning_rate};
    let dev = Device::Cpu;
    let shapes: [(&str, usize); 2] = [("a", 12), ("b", 7)];
    let value = |seed: usize, i: usize| ((seed * 7919 + i * 104_729) % 2003) as f32 / 1001.5 - 1.0;
    let init: Vec<Vec<f32>> =
        shapes.iter().enumerate().map(|(s, (_, n))| (0..*n).map(|i| value(s, i)).collect()).collect();
    let (steps, warmup, peak, wd, max_norm) = (6usize, 2usize, 0.05f64, 0.01f64, 1.0f64);
    // Gradients large enough that clipping acts on some steps, not others.
    let grads: Vec<Vec<Vec<f32>>> = (0..steps)
        .map(|t| {
            let scale = if t % 2 == 0 { 2.0 } else { 0.05 };
            shapes
                .iter()
                .enumerate()
                .map(|(s, (_, n))| (0..*n).map(|i| scale * value(10 + t * 3 + s, i)).collect())
                .collect()
        })
        .collect();

    let vars: Vec<(String, Var)> = shapes
        .iter()
        .zip(&init)
        .map(|((name, _), v)| (name.to_string(), Var::new(v.as_slice(), &dev).unwrap()))
        .collect();
    let mut opt = AdamW::new(0.9, 0.999, 1e-8, wd);
    let mut ours: Vec<Vec<Vec<f32>>> = Vec::new();
    let mut norms = Vec::new();
    for (t, g) in grads.iter().enumerate() {
        let mut map: HashMap<String, Tensor> = shapes
            .iter()
            .zip(g)
            .map(|((name, _), v)| (name.to_string(), Tensor::new(v.as_slice(), &dev).unwrap()))
            .collect();
        norms.push(clip_grad_norm(&mut map, max_norm).unwrap());
        opt.step(&vars, &map, learning_rate(Schedule::Linear, peak, t, steps, warmup)).unwrap();
        ours.push(vars.iter().map(|(_, v)| v.as_tensor().to_vec1::<f32>().unwrap()).collect());
    }

    let script = r#"
import json, sys, torch
from transformers import get_linear_schedule_with_warmup
d = json.loads(sys.argv[1])
params = [torch.nn.Parameter(torch.tensor(p, dtype=torch.float32)) for p in d["init"]]
opt = torch.optim.AdamW(params, lr=d["peak"], betas=(0.9, 0.999), eps=1e-8, weight_decay=d["wd"])
sched = get_linear_schedule_with_warmup(opt, d["warmup"], d["steps"])
out, norms = [], []
for g in d["grads"]:
    for p, gi in zip(params, g):
        p.grad = torch.tensor(gi, dtype=torch.float32)
    norms.append(float(torch.nn.utils.clip_grad_norm_(params, d["max_norm"])))
    opt.step(); sched.step(); opt.zero_grad()
    out.append([p.detach().tolist() for p in params])
print(json.dumps({"params": out, "norms": norms, "torch": torch.__version__}))
"#;
    let input = serde_json::json!({"init": init, "grads": grads, "steps": steps, "warmup": warmup, "peak": peak,
                                   "wd": wd, "max_norm": max_norm});
    let out = std::process::Command::new(&python).arg("-c").arg(script).arg(input.to_string()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let theirs: serde_json::Value =
        serde_json::from_slice(out.stdout.rsplit(|&b| b == b'\n').find(|l| !l.is_empty()).unwrap()).unwrap();
    let mut worst = 0f64;
    for (t, step) in ours.iter().enumerate() {
        let norm: f64 = theirs["norms"][t].as_f64().unwrap();
        assert!((norm - norms[t]).abs() <= 1e-5 * norm.max(1.0), "step {t}: grad norm {} vs torch {norm}", norms[t]);
        for (p, values) in step.iter().enumerate() {
            for (i, ours) in values.iter().enumerate() {
                let want = theirs["params"][t][p][i].as_f64().unwrap();
                worst = worst.max((*ours as f64 - want).abs());
            }
        }
    }
    // Moved by tenths over the six steps; f32 rounding is ~1e-7.
    let moved: f64 = ours[steps - 1][0].iter().zip(&init[0]).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
    eprintln!(
        "AdamW vs torch.optim.AdamW ({}): {steps} steps, warm-up {warmup}, clipping at {max_norm} (norms {:?}), weight decay {wd}: \
         largest parameter difference {worst:.2e} (parameters moved up to {moved:.3})",
        theirs["torch"],
        norms.iter().map(|n| format!("{n:.3}")).collect::<Vec<_>>()
    );
    assert!(moved > 0.05, "the steps barely moved the parameters: the comparison would prove little");
    assert!(worst < 1e-6, "parameters differ from PyTorch's by {worst:.2e}");
}

/// Prints, as JSON, a safetensors file's header metadata and each tensor's
/// shape, dtype and sum of absolute values, as the `safetensors` package reads them.
const PY_SUMMARY: &str = "import json,sys\nfrom safetensors import safe_open\nimport numpy as np\n\
    with safe_open(sys.argv[1], framework='numpy') as f:\n    \
    t={k: f.get_tensor(k) for k in f.keys()}\n    \
    print(json.dumps({'metadata': f.metadata(), 'tensors': {k: {'shape': list(v.shape), 'dtype': str(v.dtype), \
    'abs_sum': float(np.abs(v.astype(np.float64)).sum())} for k, v in t.items()}}))";

#[test]
fn the_adapter_follows_peft_conventions_for_gemma3() {
    let Some(models) = models_dir() else { return };
    let p = setup(&models);
    p.ok(&[
        "run",
        "r.toml",
        "--set",
        "stages.train.max_steps=1",
        "--set",
        "stages.train.targets=[\"q_proj\", \"down_proj\"]",
    ]);
    let dir = p.run(&[
        "show",
        "r.toml",
        "train",
        "--set",
        "stages.train.max_steps=1",
        "--set",
        "stages.train.targets=[\"q_proj\", \"down_proj\"]",
    ]);
    let dir = std::path::PathBuf::from(String::from_utf8_lossy(&dir.stdout).trim());
    let tensors = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<(&String, Vec<usize>)> = tensors.iter().map(|(k, t)| (k, t.dims().to_vec())).collect();
    names.sort();
    let want = vec![
        ("base_model.model.model.layers.0.mlp.down_proj.lora_A.weight", vec![4, 128]),
        ("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight", vec![64, 4]),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", vec![4, 64]),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", vec![64, 4]),
        ("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight", vec![4, 128]),
        ("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight", vec![64, 4]),
        ("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight", vec![4, 64]),
        ("base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight", vec![64, 4]),
    ];
    let got: Vec<(&str, Vec<usize>)> = names.iter().map(|(k, d)| (k.as_str(), d.clone())).collect();
    assert_eq!(got, want);
    // Hugging Face's own reader sees the same names, shapes and values, and
    // the `format: pt` header PEFT writes.
    let file = dir.join("adapter_model.safetensors");
    if let Some(out) = common::python_check("safetensors", PY_SUMMARY, &[file.to_str().unwrap()]) {
        let py: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(py["metadata"], serde_json::json!({"format": "pt"}));
        for (name, t) in &tensors {
            let abs_sum = t.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
            let seen = &py["tensors"][name];
            assert_eq!(seen["shape"], serde_json::json!(t.dims()), "{name}");
            assert_eq!(seen["dtype"], "float32", "{name}");
            assert!((seen["abs_sum"].as_f64().unwrap() - abs_sum).abs() <= 1e-5 * abs_sum.max(1.0), "{name}: {seen}");
        }
        assert_eq!(py["tensors"].as_object().unwrap().len(), tensors.len());
    }
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_alpha"], 8.0);
    assert_eq!(cfg["lora_dropout"], 0.1);
    assert_eq!(cfg["target_modules"], serde_json::json!(["down_proj", "q_proj"]));
    assert_eq!(cfg["bias"], "none");
    assert!(cfg["base_model_name_or_path"].as_str().unwrap().ends_with("tiny"));
    // Only keys PEFT 0.9's LoraConfig knows: PEFT before 0.13 refuses any other.
    const PEFT_0_9_KEYS: &[&str] = &[
        "peft_type",
        "auto_mapping",
        "base_model_name_or_path",
        "revision",
        "task_type",
        "inference_mode",
        "r",
        "target_modules",
        "lora_alpha",
        "lora_dropout",
        "fan_in_fan_out",
        "bias",
        "use_rslora",
        "modules_to_save",
        "init_lora_weights",
        "layers_to_transform",
        "layers_pattern",
        "rank_pattern",
        "alpha_pattern",
        "megatron_config",
        "megatron_core",
        "loftq_config",
        "use_dora",
    ];
    for key in cfg.as_object().unwrap().keys() {
        assert!(PEFT_0_9_KEYS.contains(&key.as_str()), "adapter_config.json has `{key}`, which PEFT does not know");
    }
    for f in ["loss.csv", "loss.svg"] {
        assert!(dir.join(f).is_file(), "{f}");
    }
    assert!(std::fs::read_to_string(dir.join("loss.svg")).unwrap().starts_with("<svg"));
}

#[test]
fn the_adapter_follows_peft_conventions_for_qwen3() {
    let Some(models) = models_dir() else { return };
    let p = Project::new();
    pipeline_model::testing::TinyQwen::new(pipeline_model::qwen::Variant::Qwen3, 151_936)
        .write(&p.path("tiny"), &models.join("qwen3-tokenizer"), 5)
        .unwrap();
    p.write("data/train.jsonl", &chat_jsonl(6));
    p.write("r.toml", &train_recipe(&p.path("tiny"), "rank = 8\nmax_steps = 1\n"));
    p.ok(&["run", "r.toml"]);
    let dir = entry(&p, "train");
    let tensors = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(tensors.len(), 2 * 7 * 2, "A and B for 7 modules in 2 layers");
    // hidden 64, 4 heads × 16, 2 kv heads × 16, intermediate 128
    for (module, inp, out) in [
        ("self_attn.q_proj", 64, 64),
        ("self_attn.k_proj", 64, 32),
        ("self_attn.v_proj", 64, 32),
        ("self_attn.o_proj", 64, 64),
        ("mlp.gate_proj", 64, 128),
        ("mlp.up_proj", 64, 128),
        ("mlp.down_proj", 128, 64),
    ] {
        for layer in 0..2 {
            let a = &tensors[&format!("base_model.model.model.layers.{layer}.{module}.lora_A.weight")];
            let b = &tensors[&format!("base_model.model.model.layers.{layer}.{module}.lora_B.weight")];
            assert_eq!((a.dims(), b.dims()), (&[8, inp][..], &[out, 8][..]), "{module}");
        }
    }
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"])
    );
    assert_eq!((cfg["r"].as_u64(), cfg["lora_alpha"].as_f64()), (Some(8), Some(32.0)));
}

#[test]
fn adapters_written_by_peft_load_and_what_we_cannot_apply_is_refused() {
    let Some(models) = models_dir() else { return };
    let p = setup(&models);
    p.ok(&["run", "r.toml", "--set", "stages.train.max_steps=1"]);
    let ours = PathBuf::from(
        String::from_utf8_lossy(&p.run(&["show", "r.toml", "train", "--set", "stages.train.max_steps=1"]).stdout)
            .trim(),
    );
    let ours_loaded = pipeline_model::adapter::load(&ours, &Device::Cpu).unwrap();
    assert!(ours_loaded.base_weights_blake3.is_some());

    // Configs as PEFT versions write them: 0.17 (keys added since 0.13), and
    // an old minimal one (no use_dora/use_rslora…, a string target, a null base).
    let peft_0_17 = r#"{"alpha_pattern": {}, "auto_mapping": null, "base_model_name_or_path": "google/gemma-3-270m-it",
        "bias": "none", "corda_config": null, "eva_config": null, "exclude_modules": null, "fan_in_fan_out": false,
        "inference_mode": true, "init_lora_weights": true, "layer_replication": null, "layers_pattern": null,
        "layers_to_transform": null, "loftq_config": {}, "lora_alpha": 8, "lora_bias": false, "lora_dropout": 0.1,
        "megatron_config": null, "megatron_core": "megatron.core", "modules_to_save": null, "peft_type": "LORA",
        "qalora_group_size": 16, "r": 4, "rank_pattern": {}, "revision": null, "target_modules": ["q_proj", "v_proj"],
        "target_parameters": null, "task_type": "CAUSAL_LM", "trainable_token_indices": null, "use_dora": false,
        "use_qalora": false, "use_rslora": false}"#;
    let peft_old = r#"{"base_model_name_or_path": null, "bias": "none", "fan_in_fan_out": false, "inference_mode": true,
        "init_lora_weights": "gaussian", "lora_alpha": 8, "lora_dropout": 0.05, "modules_to_save": null,
        "peft_type": "LORA", "r": 4, "target_modules": "all-linear", "task_type": "CAUSAL_LM", "layers_to_transform": 1}"#;
    let dir = tempfile::tempdir().unwrap();
    // PEFT's weights file: the same tensors, no base-weights hash.
    let tensors = candle_core::safetensors::load(ours.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    candle_core::safetensors::save(&tensors, dir.path().join("adapter_model.safetensors")).unwrap();
    assert!(ours.join("base_weights.json").is_file());
    for config in [peft_0_17, peft_old] {
        std::fs::write(dir.path().join("adapter_config.json"), config).unwrap();
        let loaded = pipeline_model::adapter::load(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(loaded.config.scale(), 2.0, "{config}");
        assert_eq!(loaded.tensors.len(), ours_loaded.tensors.len());
        assert_eq!(loaded.base_weights_blake3, None);
    }

    // What we would apply wrongly is refused, naming the field.
    let base: serde_json::Value = serde_json::from_str(peft_0_17).unwrap();
    for (key, value, says) in [
        ("use_dora", serde_json::json!(true), "`use_dora`"),
        ("rank_pattern", serde_json::json!({"q_proj": 8}), "`rank_pattern`"),
        ("peft_type", serde_json::json!("IA3"), "`peft_type`"),
        ("modules_to_save", serde_json::json!(["lm_head"]), "`modules_to_save`"),
        ("bias", serde_json::json!("lora_only"), "`bias`"),
    ] {
        let mut config = base.clone();
        config[key] = value;
        std::fs::write(dir.path().join("adapter_config.json"), config.to_string()).unwrap();
        let err = format!("{:#}", pipeline_model::adapter::load(dir.path(), &Device::Cpu).err().expect(key));
        assert!(err.contains(says) && err.contains("adapter_config.json"), "{key}: {err}");
    }
    // `r` that disagrees with the matrices (the scale would be wrong).
    let mut config = base.clone();
    config["r"] = 8.into();
    std::fs::write(dir.path().join("adapter_config.json"), config.to_string()).unwrap();
    let err = format!("{:#}", pipeline_model::adapter::load(dir.path(), &Device::Cpu).err().expect("r"));
    assert!(err.contains("has rank 4 but `r` in adapter_config.json is 8"), "{err}");
    // A tensor that is not a LoRA matrix (here PEFT's trained embedding) is refused, not skipped.
    std::fs::write(dir.path().join("adapter_config.json"), peft_0_17).unwrap();
    let mut with_embedding = tensors.clone();
    with_embedding.insert(
        "base_model.model.model.embed_tokens.lora_embedding_A".into(),
        candle_core::Tensor::zeros((4, 8), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&with_embedding, dir.path().join("adapter_model.safetensors")).unwrap();
    let err = format!("{:#}", pipeline_model::adapter::load(dir.path(), &Device::Cpu).err().expect("embedding"));
    assert!(err.contains("`base_model.model.model.embed_tokens.lora_embedding_A` is not a LoRA matrix"), "{err}");
    // A B without its A.
    let mut orphan = tensors.clone();
    orphan.remove("base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight").unwrap();
    candle_core::safetensors::save(&orphan, dir.path().join("adapter_model.safetensors")).unwrap();
    let err = format!("{:#}", pipeline_model::adapter::load(dir.path(), &Device::Cpu).err().expect("orphan"));
    assert!(
        err.contains("`base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight` has no matching lora_A"),
        "{err}"
    );
}

/// Central differences of `f` at entry `i` of `var`.
fn numeric_grad(var: &Var, i: usize, f: &dyn Fn() -> f64) -> f64 {
    let base = var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let shape = var.as_tensor().shape().clone();
    let eps = 1e-2f32;
    let at = |delta: f32| {
        let mut v = base.clone();
        v[i] += delta;
        var.set(&Tensor::from_vec(v, shape.clone(), &Device::Cpu).unwrap()).unwrap();
        f()
    };
    let (plus, minus) = (at(eps), at(-eps));
    var.set(&Tensor::from_vec(base, shape, &Device::Cpu).unwrap()).unwrap();
    (plus - minus) / (2.0 * eps as f64)
}

fn assert_close(analytic: f64, numeric: f64, what: &str) {
    let tol = 2e-2 * numeric.abs().max(analytic.abs()).max(1e-2);
    assert!((analytic - numeric).abs() <= tol, "{what}: analytic {analytic} vs numeric {numeric}");
}

#[test]
fn lora_linear_gradients_match_finite_differences() {
    let dev = Device::Cpu;
    let rand = |shape: &[usize], seed: u64| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| ((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 1000.0 - 0.5).collect();
        Tensor::from_vec(v, shape, &dev).unwrap()
    };
    let x = Var::from_tensor(&rand(&[5, 6], 1)).unwrap();
    let w = rand(&[4, 6], 2);
    let a = Var::from_tensor(&rand(&[3, 6], 3)).unwrap();
    let b = Var::from_tensor(&rand(&[4, 3], 4)).unwrap();
    let r = rand(&[5, 4], 5);
    let layer = LoraLinear {
        weight: w.clone(),
        quantized: None,
        bias: None,
        lora: Some(Lora { a: a.clone(), b: b.clone(), scale: 1.5, dropout: 0.0 }),
    };
    let loss = || layer.forward(x.as_tensor(), Some(&NoDropout)).unwrap().mul(&r).unwrap().sum_all().unwrap();
    let grads = loss().backward().unwrap();
    let f = || loss().to_scalar::<f32>().unwrap() as f64;
    for (name, var) in [("x", &x), ("A", &a), ("B", &b)] {
        let g = grads.get(var).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for i in [0, 3, g.len() - 1] {
            assert_close(g[i] as f64, numeric_grad(var, i, &f), &format!("d loss / d {name}[{i}]"));
        }
    }
    // The frozen-weight matmul gives x the same gradient as candle's matmul.
    let plain = x.as_tensor().matmul(&w.t().unwrap()).unwrap().mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
    let frozen = frozen_linear(x.as_tensor(), &w).unwrap().mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
    let diff = (plain.get(&x).unwrap() - frozen.get(&x).unwrap()).unwrap().abs().unwrap().max_all().unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
}

#[test]
fn full_model_gradients_match_finite_differences() {
    let Some(models) = models_dir() else { return };
    let p = Project::new();
    tiny_gemma3(&models, &p.path("tiny"), 64);
    let resolved = pipeline_model::ModelFiles {
        source: "tiny".into(),
        dir: p.path("tiny"),
        tokenizer_json: None,
        tokenizer_config: None,
        config_json: Some(p.path("tiny/config.json")),
        chat_template_file: None,
        weights: vec![p.path("tiny/model.safetensors")],
        revision: None,
        weight_ids: Default::default(),
        gguf_tokenizer_unread: None,
    };
    let mut model = pipeline_model::load(&resolved, &Device::Cpu, 64).unwrap();
    // LoRA on every module of both layers (one sliding, one global), with a
    // non-zero B so that every A receives a gradient.
    let mut vars: HashMap<String, (Var, Var)> = HashMap::new();
    for (i, (name, lin)) in model.linears_mut().into_iter().enumerate() {
        let mut rng = pipeline_train::rng_for(1, "t", i as u64, 0);
        let a =
            Var::from_tensor(&pipeline_model::lora::init_lora_a(2, lin.in_features(), &mut rng, &Device::Cpu).unwrap())
                .unwrap();
        let b = Var::from_tensor(
            &(pipeline_model::lora::init_lora_a(lin.out_features(), 2, &mut rng, &Device::Cpu).unwrap() * 0.5).unwrap(),
        )
        .unwrap();
        lin.lora = Some(Lora { a: a.clone(), b: b.clone(), scale: 2.0, dropout: 0.0 });
        vars.insert(name, (a, b));
    }
    // 12 tokens: longer than the sliding window (8) of layer 0.
    let ids: Vec<u32> = (0..12).map(|i| (i * 7919 + 13) % 151_000).collect();
    let mask: Vec<u8> = (0..12).map(|i| u8::from(i >= 4)).collect();
    let loss = || pipeline_train::example_loss(model.as_ref(), &ids, &mask, Some(&NoDropout)).unwrap().0;
    let grads = loss().backward().unwrap();
    let f = || loss().to_scalar::<f32>().unwrap() as f64;
    for module in [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
        "model.layers.1.mlp.up_proj",
        "model.layers.1.self_attn.o_proj",
    ] {
        let (a, b) = &vars[module];
        for (which, var) in [("A", a), ("B", b)] {
            let g = grads.get(var).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let i = g.iter().enumerate().max_by(|x, y| x.1.abs().total_cmp(&y.1.abs())).unwrap().0;
            assert_close(g[i] as f64, numeric_grad(var, i, &f), &format!("{module}.lora_{which}[{i}]"));
        }
    }
}

#[test]
fn training_mistakes_fail_clearly() {
    let Some(models) = models_dir() else { return };
    let p = setup(&models);
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::create_dir_all(p.path("tokenizer-only")).unwrap();
        std::fs::copy(models.join("qwen3-tokenizer").join(f), p.path("tokenizer-only").join(f)).unwrap();
    }
    let cases: Vec<(Vec<&str>, i32, Vec<&str>)> = vec![
        (vec!["--set", "stages.train.rank=0"], 2, vec!["r.toml:", "stages.train.rank", "at least 1"]),
        (
            vec!["--set", "stages.train.targets=[\"q_prj\"]"],
            2,
            vec!["stages.train.targets", "`q_prj` matches no linear module", "did you mean `q_proj`"],
        ),
        (vec!["--set", "stages.train.targets=\"everything\""], 2, vec!["stages.train.targets", "all-linear"]),
        (
            vec![
                "--set",
                "stages.train.learning_rate=1e30",
                "--set",
                "stages.train.checkpoint_every=1",
                "--set",
                "stages.train.max_grad_norm=0",
            ],
            1,
            vec![
                "stage `train`",
                "the loss became",
                "The last good checkpoint (step ",
                "is kept and a rerun resumes from it",
            ],
        ),
        (vec!["--set", "model.base=tokenizer-only"], 1, vec!["stage `train`", "has no weights", "fetch-models.sh"]),
    ];
    for (args, code, expect) in cases {
        let mut full = vec!["run", "r.toml"];
        full.extend(&args);
        let out = p.run(&full);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        for e in expect {
            assert!(stderr.contains(e), "{args:?}: missing `{e}` in:\n{stderr}");
        }
    }
    // The NaN run kept its checkpoints in the work dir.
    let kept = std::fs::read_dir(p.path(".pipeline/work"))
        .unwrap()
        .filter_map(|e| std::fs::read_dir(e.unwrap().path().join("checkpoints")).ok())
        .flatten()
        .any(|c| c.unwrap().path().join("state.json").is_file());
    assert!(kept, "no checkpoint kept after the NaN loss");

    // Examples longer than the model's context.
    let q = Project::new();
    tiny_gemma3(&models, &q.path("tiny"), 16);
    q.write("data/train.jsonl", &chat_jsonl(4));
    q.write("r.toml", &train_recipe(&q.path("tiny"), "max_steps = 1\n"));
    let out = q.run(&["run", "r.toml"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("the model's context is 16") && stderr.contains("max_len"), "{stderr}");
}

#[test]
fn bench_train_prints_the_json_contract() {
    let Some(models) = models_dir() else { return };
    let p = Project::new();
    tiny_gemma3(&models, &p.path("tiny"), 4096);
    let out = p.run(&["bench", "train", "--model", "tiny", "--max-len", "64", "--steps", "2", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["tokens_per_s"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["peak_rss_bytes"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["max_len"], 64);
    let mean = v["mean_tokens"].as_f64().unwrap();
    assert!(mean > 0.0 && mean <= 64.0, "{v}");
    let kernels = v["kernels"].as_str().unwrap();
    assert!(kernels.starts_with("vmath "), "{v}");
    if std::env::var_os("PIPELINE_MAX_CPU_ISA").is_none() {
        assert!(!kernels.contains("PIPELINE_MAX_CPU_ISA"), "{v}");
    }
    // Capped to the portable paths, the same command trains and says so.
    let args = ["bench", "train", "--model", "tiny", "--max-len", "64", "--steps", "1", "--json"];
    let out = p.cmd(&args).env("PIPELINE_MAX_CPU_ISA", "portable").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let kernels = v["kernels"].as_str().unwrap();
    let vmath = if cfg!(target_arch = "aarch64") { "vmath neon," } else { "vmath portable," };
    for part in [vmath, "quantized gemv portable", "quantized prefill portable", "bf16 gemm widen-f32"] {
        assert!(kernels.contains(part), "{part}: {kernels}");
    }
    assert!(kernels.ends_with("(PIPELINE_MAX_CPU_ISA=portable)"), "{kernels}");
}

/// `bench train --compare-peft` trains the same examples with PyTorch +
/// PEFT (the embedded `scripts/peft_bench.py`) and prints both speeds; the
/// command itself fails if PEFT trained other examples than we did.
#[test]
fn bench_train_compare_peft_runs_the_same_examples_in_pytorch() {
    let (Some(models), Some(python)) = (models_dir(), common::torch_python()) else { return };
    let p = Project::new();
    tiny_gemma3(&models, &p.path("tiny"), 4096);
    let python = python.to_str().unwrap();
    let args = ["--max-len", "64", "--steps", "2", "--compare-peft", "--repetitions", "1", "--json"];
    let out = p.run(&[&["bench", "train", "--model", "tiny", "--python", python][..], &args].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for side in ["pipeline", "peft"] {
        assert!(v["tokens_per_s"][side]["mean"].as_f64().unwrap() > 0.0, "{side}: {v}");
        assert_eq!(v["tokens_per_s"][side]["runs"].as_array().unwrap().len(), 1, "{v}");
        assert!(v["peak_rss_bytes"][side].as_u64().unwrap() > 0, "{side}: {v}");
    }
    assert!(v["tokens_per_s"]["ratio"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["peft_versions"].as_str().unwrap().contains("peft 0.21"), "{v}");
    let mean = v["mean_tokens"].as_f64().unwrap();
    assert!(mean > 0.0 && mean <= 64.0, "{v}");
}

#[test]
fn bench_generate_prints_the_json_contract() {
    let Some(models) = models_dir() else { return };
    let p = Project::new();
    tiny_gemma3(&models, &p.path("tiny"), 4096);
    let args = ["bench", "generate", "--model", "tiny", "--prompt-tokens", "64", "--new-tokens", "5", "--json"];
    let out = p.run(&[&args[..], &["--batch", "3"]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in ["prefill_tokens_per_s", "decode_tokens_per_s", "batch_decode_tokens_per_s"] {
        assert!(v[key].as_f64().unwrap() > 0.0, "{key}: {v}");
    }
    assert_eq!(
        (v["prompt_tokens"].as_u64(), v["new_tokens"].as_u64(), v["batch"].as_u64()),
        (Some(64), Some(5), Some(3))
    );
    // Without --batch, the single-stream figures only.
    let out = p.run(&args);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v.get("batch").is_none() && v.get("batch_decode_tokens_per_s").is_none(), "{v}");
}

#[test]
fn gradient_checkpointing_gives_the_same_gradients_with_the_same_dropout() {
    let Some(models) = models_dir() else { return };
    use pipeline_model::qwen::Variant;
    use pipeline_model::testing::TinyQwen;
    let p = Project::new();
    tiny_gemma3(&models, &p.path("gemma3"), 64);
    TinyQwen::new(Variant::Qwen2, 151_936).write(&p.path("qwen2"), &models.join("qwen3-tokenizer"), 3).unwrap();
    for arch in ["gemma3", "qwen2"] {
        let resolved = pipeline::model_source::from_path(&p.path(arch)).unwrap();
        let mut model = pipeline_model::load(&resolved, &Device::Cpu, 64).unwrap();
        let targets: Vec<String> = pipeline_model::TARGETS.iter().map(|s| s.to_string()).collect();
        let (params, _) = pipeline_train::attach_lora(model.as_mut(), &targets, 4, 2.0, 0.2, 5).unwrap();
        // Non-zero B, so that every A has a gradient too.
        for (name, var) in &params {
            if name.contains("lora_B") {
                let mut rng = pipeline_train::rng_for(9, name, 0, 0);
                let (o, r) = var.dims2().unwrap();
                var.set(&pipeline_model::lora::init_lora_a(o, r, &mut rng, &Device::Cpu).unwrap()).unwrap();
            }
        }
        let ids: Vec<u32> = (0..20).map(|i| (i * 7919 + 13) % 151_000).collect();
        let mask: Vec<u8> = (0..20).map(|i| u8::from(i >= 6)).collect();
        let run = |checkpointing: bool| {
            let dropout = pipeline_train::SeededDropout::new(11, 3, 1);
            pipeline_train::example_grads(model.as_ref(), &ids, &mask, Some(&dropout), 0.5, &params, checkpointing)
                .unwrap()
        };
        let (l1, n1, g1) = run(false);
        let (l2, n2, g2) = run(true);
        assert_eq!((l1, n1), (l2, n2), "{arch}: the same loss");
        assert_eq!(g1.len(), params.len(), "{arch}: every LoRA matrix has a gradient");
        assert_eq!(g1.len(), g2.len());
        for (name, a) in &g1 {
            let b = &g2[name];
            let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let scale = a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(scale > 0.0, "{arch} {name}: zero gradient");
            assert!(diff <= 1e-5 * scale.max(1.0), "{arch} {name}: {diff} vs scale {scale}");
        }
    }
}

/// A bf16 checkpoint (as Google ships Gemma 3) trained in bf16 keeps its
/// matrices as stored, never widened on the way; norms come out in f32; in
/// f32 the same file gives the exact widening; and the model runs either way.
#[test]
fn bf16_checkpoints_load_straight_into_bf16() {
    use candle_core::DType;
    use pipeline_model::{ModelFiles, Precision, load_weights_as};
    let Some(models) = models_dir() else { return };
    let p = Project::new();
    let tiny = pipeline_model::testing::TinyGemma3::new(151_936);
    tiny.write_as(&p.path("tiny"), &models.join("qwen3-tokenizer"), 7, DType::BF16).unwrap();
    let files = ModelFiles::from_dir("tiny", &p.path("tiny")).unwrap();
    let stored = candle_core::safetensors::load(p.path("tiny/model.safetensors"), &Device::Cpu).unwrap();
    let name = "model.layers.0.mlp.up_proj.weight";
    assert_eq!(stored[name].dtype(), DType::BF16);
    let same = |a: &Tensor, b: &Tensor| {
        let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap();
        d.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() == 0.0
    };
    let (_, mut w) = load_weights_as(&files, &Device::Cpu, false, Precision::Bf16).unwrap();
    let up = w.frozen(name).unwrap();
    assert_eq!(up.dtype(), DType::BF16);
    assert!(same(&up, &stored[name]));
    assert_eq!(w.take("model.norm.weight").unwrap().dtype(), DType::F32);
    let (_, mut w) = load_weights_as(&files, &Device::Cpu, false, Precision::F32).unwrap();
    let up = w.frozen(name).unwrap();
    assert_eq!(up.dtype(), DType::F32);
    assert!(same(&up, &stored[name]));
    for precision in [Precision::Bf16, Precision::F32] {
        let m = pipeline_model::load_in(&files, &Device::Cpu, 64, precision).unwrap();
        let hidden = m.hidden(&[2, 10, 20, 30], None).unwrap();
        let finite = hidden.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| v.is_finite());
        assert!(finite, "{precision:?}: hidden states not finite");
    }
}

/// `loss_averaging = "token"` weighs every supervised token of a step the
/// same (transformers since 4.46); `"example"` weighs every example the same.
/// Two examples whose answers differ in length tell the two apart.
#[test]
fn token_averaging_weighs_tokens_and_example_averaging_weighs_examples() {
    use pipeline_train::{LossAveraging, TokenizedSplit, TrainConfig, Trainer};
    let Some(models) = models_dir() else { return };
    let p = Project::new();
    tiny_gemma3(&models, &p.path("tiny"), 64);
    let resolved = pipeline::model_source::from_path(&p.path("tiny")).unwrap();
    let ids = |seed: u32| (0..24).map(|i| (i * 7919 + seed) % 151_000).collect::<Vec<u32>>();
    // 3 supervised tokens against 17.
    let examples = [
        (ids(13), (0..24).map(|i| u8::from(i >= 21)).collect::<Vec<u8>>()),
        (ids(29), { (0..24).map(|i| u8::from(i >= 7)).collect::<Vec<u8>>() }),
    ];
    // Before the first update B = 0: the model is the base model.
    let base = pipeline_model::load(&resolved, &Device::Cpu, 64).unwrap();
    let (losses, counts): (Vec<f64>, Vec<f64>) = examples
        .iter()
        .map(|(ids, mask)| {
            let (l, n) = pipeline_train::example_loss(base.as_ref(), ids, mask, None).unwrap();
            (l.to_scalar::<f32>().unwrap() as f64, n as f64)
        })
        .unzip();
    assert_eq!(counts, [3.0, 17.0]);
    let per_example = (losses[0] + losses[1]) / 2.0;
    let per_token = (losses[0] * counts[0] + losses[1] * counts[1]) / (counts[0] + counts[1]);
    assert!((per_example - per_token).abs() > 1e-3, "the two averages coincide; pick other examples");
    for (averaging, want) in [(LossAveraging::Example, per_example), (LossAveraging::Token, per_token)] {
        let split = TokenizedSplit::from_examples(
            examples.iter().enumerate().map(|(i, (ids, mask))| (format!("e{i}"), ids.clone(), mask.clone())),
        );
        let model = pipeline_model::load(&resolved, &Device::Cpu, 64).unwrap();
        let cfg = TrainConfig {
            gradient_accumulation: 2,
            loss_averaging: averaging,
            max_steps: Some(1),
            lora: pipeline_train::LoraConfig { dropout: 0.0, ..Default::default() },
            ..TrainConfig::default()
        };
        let mut trainer = Trainer::new(model, split, None, cfg).unwrap();
        let (row, _) = trainer.step().unwrap();
        assert!((row.loss - want).abs() < 1e-5, "{averaging:?}: step loss {} against {want}", row.loss);
    }
}
