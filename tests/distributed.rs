//! Data-parallel training over MPI, launched as people launch it:
//! `mpirun -np 2 pipeline run recipes/quickstart.toml`, on a tiny random
//! Gemma 3 with the real Gemma 3 tokenizer. Built and run with the `mpi`
//! feature only (`required-features` in Cargo.toml; `scripts/test-mpi.sh`,
//! which CI runs): two ranks each computing
//! half of every optimizer step's examples train the adapter one process
//! trains; a rank killed with SIGKILL fails the job, and the rerun resumes
//! from rank 0's last checkpoint.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::Project;

/// The quickstart, shortened: 6 optimizer steps of 4 examples, a
/// checkpoint every 2, validation loss every 3.
const SET: &[&str] = &[
    "stages.chat.train_on=first-assistant",
    "stages.tokens.max_len=256",
    "stages.train.max_steps=6",
    "stages.train.gradient_accumulation=4",
    "stages.train.checkpoint_every=2",
    "stages.train.eval_every=3",
    "stages.train.eval_examples=4",
];

fn args(p: &Project) -> Vec<String> {
    let mut a: Vec<String> = vec!["run".into(), "quickstart.toml".into(), "--until".into(), "train".into()];
    for s in SET {
        a.extend(["--set".into(), s.to_string()]);
    }
    a.extend(["--set".into(), format!("model.base='{}'", p.path("tiny").display())]);
    a
}

/// `mpirun` with the options a container needs (root, no CPU binding: each
/// rank computes on one thread), running `ranks` (each a list of extra
/// environment variables) as one job.
fn mpirun(p: &Project, cache: &Path, ranks: &[&[(&str, &str)]]) -> Command {
    let mut c = Command::new("mpirun");
    c.current_dir(p.dir.path())
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .env("HF_HOME", common::shared_dir().join("hf"))
        .env("HF_HUB_OFFLINE", "1")
        .env("PIPELINE_CACHE_DIR", cache)
        .env("PIPELINE_PROGRESS", "0")
        .env("RAYON_NUM_THREADS", "1")
        .env("RUST_LOG", "warn")
        .env_remove("PIPELINE_FAULT")
        .env_remove("PIPELINE_PAUSE");
    for (i, env) in ranks.iter().enumerate() {
        if i > 0 {
            c.arg(":");
        }
        c.args(["--oversubscribe", "--bind-to", "none", "-np", "1"]);
        for var in
            ["HF_HOME", "HF_HUB_OFFLINE", "PIPELINE_CACHE_DIR", "PIPELINE_PROGRESS", "RAYON_NUM_THREADS", "RUST_LOG"]
        {
            c.args(["-x", var]);
        }
        c.arg("env");
        c.args(env.iter().map(|(k, v)| format!("{k}={v}")));
        c.arg(env!("CARGO_BIN_EXE_pipeline"));
        c.args(args(p));
    }
    c
}

fn mpirun_ok(p: &Project, cache: &Path, ranks: &[&[(&str, &str)]]) -> String {
    let out = mpirun(p, cache, ranks).output().expect("mpirun runs (scripts/install-mpi.sh installs Open MPI)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "mpirun failed:\n{text}");
    text
}

/// The finished training entry of the cache at `cache`.
fn train_entry(p: &Project, cache: &Path) -> PathBuf {
    let out = p
        .cmd(&["show", "quickstart.toml", "train"])
        .args(args(p).iter().skip(4))
        .env("PIPELINE_CACHE_DIR", cache)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// (step, loss, eval loss) of each row of loss.csv.
fn losses(entry: &Path) -> Vec<(u64, f64, Option<f64>)> {
    let csv = std::fs::read_to_string(entry.join("loss.csv")).unwrap();
    pipeline_train::plot::read_loss_csv(&csv).into_iter().map(|r| (r.step, r.loss, r.eval_loss)).collect()
}

fn adapter(entry: &Path) -> Vec<(String, Vec<f32>)> {
    let tensors =
        candle_core::safetensors::load(entry.join("adapter_model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let mut v: Vec<(String, Vec<f32>)> =
        tensors.into_iter().map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn metrics(entry: &Path) -> serde_json::Value {
    serde_json::from_slice::<serde_json::Value>(&std::fs::read(entry.join("manifest.json")).unwrap()).unwrap()["metrics"]
        .clone()
}

/// Largest |a − b| over every adapter value, and the largest |a|.
fn max_difference(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> (f32, f32) {
    assert_eq!(a.iter().map(|t| &t.0).collect::<Vec<_>>(), b.iter().map(|t| &t.0).collect::<Vec<_>>());
    let mut worst = 0f32;
    let mut scale = 0f32;
    for ((_, x), (_, y)) in a.iter().zip(b) {
        for (p, q) in x.iter().zip(y) {
            worst = worst.max((p - q).abs());
            scale = scale.max(p.abs());
        }
    }
    (worst, scale)
}

#[test]
fn two_mpi_ranks_train_the_quickstarts_adapter_and_resume_after_a_rank_is_killed() {
    let Some(models) = common::models_dir() else { return };
    let p = Project::new();
    let recipe = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/quickstart.toml")).unwrap();
    p.write("quickstart.toml", &recipe);
    pipeline_model::testing::TinyGemma3::new(262_144).write(&p.path("tiny"), &models.join("gemma-3-270m"), 7).unwrap();

    // One process, accumulating 4 examples per step.
    let one_cache = p.path("one");
    let mut one = p.cmd(&args(&p).iter().map(String::as_str).collect::<Vec<_>>());
    let out = one.env("PIPELINE_CACHE_DIR", &one_cache).env("RAYON_NUM_THREADS", "1").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let one = train_entry(&p, &one_cache);

    // Two ranks, 2 of the 4 examples each per step.
    let two_cache = p.path("two");
    let log = mpirun_ok(&p, &two_cache, &[&[], &[]]);
    assert!(log.contains("data-parallel over 2 ranks (mpi)"), "{log}");
    assert_eq!(log.matches("ran     train").count(), 1, "rank 0 alone reports the training:\n{log}");
    let two = train_entry(&p, &two_cache);
    assert_eq!(one.file_name(), two.file_name(), "the cache key does not depend on the number of ranks");
    assert_eq!((metrics(&one)["world_size"].as_u64(), metrics(&two)["world_size"].as_u64()), (Some(1), Some(2)));

    // Losses are summed in example order whichever rank computed them: the
    // first step's is the same to the bit; later ones follow the adapter,
    // whose gradients two ranks add in another order.
    let (l1, l2) = (losses(&one), losses(&two));
    assert_eq!(l1.len(), 6);
    assert_eq!(l1.iter().map(|r| r.0).collect::<Vec<_>>(), l2.iter().map(|r| r.0).collect::<Vec<_>>());
    assert_eq!(l1[0].1, l2[0].1, "step 1's loss");
    for (a, b) in l1.iter().zip(&l2) {
        assert!((a.1 - b.1).abs() <= 1e-5 * a.1.abs(), "step {}: loss {} vs {}", a.0, a.1, b.1);
        assert_eq!(a.2.is_some(), b.2.is_some());
        if let (Some(x), Some(y)) = (a.2, b.2) {
            assert!((x - y).abs() <= 1e-5 * x.abs(), "step {}: eval loss {x} vs {y}", a.0);
        }
    }
    let (worst, scale) = max_difference(&adapter(&one), &adapter(&two));
    eprintln!("1 rank vs 2 ranks: adapters differ by at most {worst:e} (largest value {scale:e})");
    assert!(worst <= 1e-5 * scale, "the adapters differ by {worst} (largest value {scale})");
    for (name, m) in [("1 rank", metrics(&one)), ("2 ranks", metrics(&two))] {
        let per_step = m["seconds_this_run"].as_f64().unwrap() / 6.0;
        eprintln!("{name}: {per_step:.2} s per optimizer step (one thread per rank)");
    }

    // Rank 1 is killed (SIGKILL) after step 3, the checkpoint of step 2
    // written: the job fails, and a rerun resumes from that checkpoint and
    // ends with the uninterrupted two-rank run's adapter, to the bit.
    let killed_cache = p.path("killed");
    let mut job = mpirun(&p, &killed_cache, &[&[], &[("PIPELINE_PAUSE", "lora-train.step-3")]]);
    let mut child = job.stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    let reader = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let mut pid = None;
    for line in reader.lines() {
        let line = line.unwrap();
        seen += &line;
        seen += "\n";
        if let Some(rest) = line.strip_prefix("paused at lora-train.step-3 (pid ") {
            pid = rest.trim_end_matches(')').parse::<i32>().ok();
            break;
        }
    }
    let pid = pid.unwrap_or_else(|| panic!("rank 1 never paused:\n{seen}"));
    assert!(Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap().success());
    let status = child.wait().unwrap();
    assert!(!status.success(), "the job goes on without rank 1");
    let plan = p
        .cmd(&["plan", "quickstart.toml"])
        .args(args(&p).iter().skip(4))
        .env("PIPELINE_CACHE_DIR", &killed_cache)
        .output()
        .unwrap();
    let plan = String::from_utf8_lossy(&plan.stdout).into_owned() + &String::from_utf8_lossy(&plan.stderr);
    assert!(plan.contains("resume at step 2"), "the plan resumes from rank 0's checkpoint:\n{plan}");
    mpirun_ok(&p, &killed_cache, &[&[], &[]]);
    let resumed = train_entry(&p, &killed_cache);
    assert_eq!(metrics(&resumed)["resumed_from_step"].as_u64(), Some(2));
    assert_eq!(losses(&resumed), l2, "the resumed run's log is the uninterrupted run's");
    assert_eq!(adapter(&resumed), adapter(&two), "the resumed adapter is the uninterrupted run's");
}
