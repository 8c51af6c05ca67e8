//! Sweeps: variants plan to the keys of the same recipe edited by hand and
//! share the stages their edits do not touch; processes sharing a cache (a
//! directory, or a remote one) split the variants and run each once;
//! `compare` ranks them and draws their loss curves; `export --variant`.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::Stdio;

use common::Project;
use serde_json::{Value, json};

/// A tiny trained model with an evaluation, over 16 tool-call rows.
fn base_recipe(p: &Project) -> Option<String> {
    let models = common::models_dir()?;
    common::tiny_gemma3(&models, &p.path("model"), 4096);
    p.write("data/train.jsonl", &common::chat_jsonl(16));
    Some(
        common::train_recipe(&p.path("model"), "max_steps = 3\nrank = 4\ncheckpoint_every = 1\n")
            + "\n[stages.eval]\nkind = \"evaluate\"\nconversations = \"chat\"\nadapter = \"train\"\n\
               compare = [\"base\", \"adapter\"]\n[stages.eval.generation]\nmax_new_tokens = 4\n",
    )
}

const SWEEP: &str = "\n[sweep]\n\"stages.train.learning_rate\" = [1e-3, 3e-3]\n\"stages.train.rank\" = [2, 4]\n";

/// stage name → key, per variant, from `plan --json`.
fn variant_keys(p: &Project, args: &[&str]) -> Vec<(String, BTreeMap<String, String>)> {
    let mut full = vec!["plan", "--json"];
    full.extend_from_slice(args);
    let out = p.run(&full);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["variants"]
        .as_array()
        .expect("a sweep plans variants")
        .iter()
        .map(|var| {
            let keys = var["stages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| (s["name"].as_str().unwrap().to_string(), s["key"].as_str().unwrap().to_string()))
                .collect();
            (var["label"].as_str().unwrap().to_string(), keys)
        })
        .collect()
}

fn keys_of(p: &Project, recipe: &str) -> BTreeMap<String, String> {
    let out = p.run(&["plan", "--json", recipe]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap().to_string(), s["key"].as_str().unwrap().to_string()))
        .collect()
}

#[test]
fn variants_have_the_keys_of_the_recipe_edited_by_hand_and_share_the_rest() {
    let p = Project::new();
    let Some(base) = base_recipe(&p) else { return };
    p.write("sweep.toml", &(base.clone() + SWEEP));
    let variants = variant_keys(&p, &["sweep.toml"]);
    let labels: Vec<&str> = variants.iter().map(|(l, _)| l.as_str()).collect();
    assert_eq!(
        labels,
        [
            "learning_rate=0.001 rank=2",
            "learning_rate=0.001 rank=4",
            "learning_rate=0.003 rank=2",
            "learning_rate=0.003 rank=4"
        ]
    );
    for (i, (lr, rank)) in [("1e-3", 2), ("1e-3", 4), ("3e-3", 2), ("3e-3", 4)].into_iter().enumerate() {
        let edited = base.replace("rank = 4\n", &format!("rank = {rank}\nlearning_rate = {lr}\n"));
        p.write(&format!("edited-{i}.toml"), &edited);
        assert_eq!(variants[i].1, keys_of(&p, &format!("edited-{i}.toml")), "variant {}", i + 1);
    }
    // The same sweep from the command line plans the same keys.
    p.write("plain.toml", &base);
    let cli = variant_keys(
        &p,
        &["plain.toml", "--sweep", "stages.train.learning_rate=1e-3,3e-3", "--sweep", "stages.train.rank=2,4"],
    );
    assert_eq!(cli, variants);
    // Shared: the data stages and the base model's evaluation; own: training on.
    for stage in ["data", "chat", "tokens", "eval.base"] {
        let distinct: std::collections::BTreeSet<&String> = variants.iter().map(|(_, k)| &k[stage]).collect();
        assert_eq!(distinct.len(), 1, "`{stage}` is shared by every variant");
    }
    for stage in ["train", "eval"] {
        let distinct: std::collections::BTreeSet<&String> = variants.iter().map(|(_, k)| &k[stage]).collect();
        assert_eq!(distinct.len(), 4, "each variant trains its own `{stage}`");
    }
    let out = p.run(&["plan", "sweep.toml"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("sweep: 4 variants") && stdout.contains("shared by all") && stdout.contains("own"),
        "{stdout}"
    );

    // Bad axes name the key.
    p.write("bad.toml", &(base.clone() + "\n[sweep]\n\"stages.train.rank\" = []\n"));
    let err = String::from_utf8_lossy(&p.run(&["plan", "bad.toml"]).stderr).into_owned();
    assert!(err.contains("`stages.train.rank` has no values"), "{err}");
    let err = String::from_utf8_lossy(&p.run(&["plan", "plain.toml", "--sweep", "stages.trian.rank=2,4"]).stderr)
        .into_owned();
    assert!(err.contains("no stage `trian`") && err.contains("did you mean `stages.train`?"), "{err}");
    let err = String::from_utf8_lossy(&p.run(&["show", "sweep.toml", "train"]).stderr).into_owned();
    assert!(err.contains("sweeps 4 variants") && err.contains("--variant"), "{err}");
}

/// Which variants a `run` of a sweep ran (its "variant N/M:" lines).
fn ran(stderr: &str) -> Vec<usize> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("pipeline: variant "))
        .filter_map(|rest| rest.split_once('/').and_then(|(n, _)| n.parse().ok()))
        .collect()
}

/// Two processes run one sweep at once over one cache: the first is held
/// inside variant 1's training while the second starts; each variant's
/// training runs exactly once.
fn two_processes_split_the_sweep(p: &Project, extra: &[&str], local: [&str; 2]) {
    let mut a_args = vec!["run", "sweep.toml"];
    a_args.extend_from_slice(extra);
    let mut first = p.cmd(&a_args);
    first
        .env("PIPELINE_LOCAL_CACHE", p.path(local[0]))
        .env("PIPELINE_PAUSE", "lora-train.step-1")
        .env("PIPELINE_PAUSE_SECONDS", "15")
        .stderr(Stdio::piped());
    let mut a = first.spawn().unwrap();
    let mut reader = BufReader::new(a.stderr.take().unwrap());
    let mut a_err = String::new();
    loop {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).unwrap() > 0, "the first process ended early:\n{a_err}");
        a_err += &line;
        if line.starts_with("paused at lora-train.step-1") {
            break;
        }
    }
    let mut second = p.cmd(&a_args);
    second.env("PIPELINE_LOCAL_CACHE", p.path(local[1]));
    let b = second.output().unwrap();
    let b_err = String::from_utf8_lossy(&b.stderr).into_owned();
    assert!(b.status.success(), "{b_err}");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut reader, &mut rest).unwrap();
    a_err += &rest;
    assert!(a.wait().unwrap().success(), "{a_err}");
    let (ran_a, ran_b) = (ran(&a_err), ran(&b_err));
    assert_eq!(ran_a, [1], "the first process runs variant 1, and finds 2 done or being run:\n{a_err}");
    assert_eq!(ran_b, [2], "the second passes over the claimed variant 1:\n{b_err}");
    assert!(b_err.contains("variant 1 (learning_rate=0.001) is being run by"), "{b_err}");
    // Each training ran once: one "ran" line per lora-train across both.
    let trained = |e: &str| e.lines().filter(|l| l.trim_start().starts_with("ran     train ")).count();
    assert_eq!(trained(&a_err) + trained(&b_err), 2, "A:\n{a_err}\nB:\n{b_err}");
}

#[test]
fn two_processes_sharing_a_cache_directory_run_each_variant_once() {
    let p = Project::new();
    let Some(base) = base_recipe(&p) else { return };
    p.write("sweep.toml", &(base + "\n[sweep]\n\"stages.train.learning_rate\" = [1e-3, 3e-3]\n"));
    two_processes_split_the_sweep(&p, &[], [".pipeline", ".pipeline"]);
    // Now everything is cached, and compare ranks both variants.
    let again = p.ok(&["run", "sweep.toml"]);
    assert!(again.contains("variant 1 (learning_rate=0.001) is cached"), "{again}");
    let out = p.run(&["compare", "sweep.toml", "--by", "loss", "-o", "cmp"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: Value = serde_json::from_slice(&std::fs::read(p.path("cmp/compare.json")).unwrap()).unwrap();
    let losses: Vec<f64> =
        json["variants"].as_array().unwrap().iter().map(|v| v["metrics"]["loss"]["value"].as_f64().unwrap()).collect();
    assert_eq!(losses.len(), 2);
    assert!(losses[0] <= losses[1], "best (lowest eval loss) first: {losses:?}");
    assert_eq!(json["ranked_by"], "loss");
    assert!(stdout.lines().count() == 3 && stdout.contains("learning_rate=0.003"), "{stdout}");
    let md = std::fs::read_to_string(p.path("cmp/compare.md")).unwrap();
    assert!(md.contains("| # | variant |") && md.contains("train min"), "{md}");
    let svg = std::fs::read_to_string(p.path("cmp/loss.svg")).unwrap();
    assert!(svg.contains("1: learning_rate=0.001") && svg.contains("2: learning_rate=0.003"), "both curves: legend");
    let err = String::from_utf8_lossy(&p.run(&["compare", "sweep.toml", "--by", "nonsense"]).stderr).into_owned();
    assert!(err.contains("--by nonsense") && err.contains("decision_accuracy"), "{err}");
    // The evaluate stage that scores them can be named.
    p.ok(&["compare", "sweep.toml", "--eval", "eval", "--by", "loss", "-o", "cmp2"]);
    let named: Value = serde_json::from_slice(&std::fs::read(p.path("cmp2/compare.json")).unwrap()).unwrap();
    assert_eq!((&named["evaluate_stage"], &named["variants"]), (&json!("eval"), &json["variants"]));
    let err = String::from_utf8_lossy(&p.run(&["compare", "sweep.toml", "--eval", "train"]).stderr).into_owned();
    assert!(err.contains("--eval train") && err.contains("its evaluate stages: eval"), "{err}");

    // export takes one variant.
    p.ok(&["export", "sweep.toml", "--variant", "2", "--to", "out"]);
    let exported = std::fs::read_to_string(p.path("out/train/adapter_config.json")).unwrap();
    let cfg: Value = serde_json::from_str(&exported).unwrap();
    assert_eq!(cfg["r"], 4);
    let err =
        String::from_utf8_lossy(&p.run(&["export", "sweep.toml", "--variant", "9", "--to", "x"]).stderr).into_owned();
    assert!(err.contains("--variant `9`: no such variant") && err.contains("learning_rate=0.003"), "{err}");
}

#[test]
fn two_machines_sharing_a_remote_cache_run_each_variant_once() {
    let p = Project::new();
    let Some(base) = base_recipe(&p) else { return };
    p.write("sweep.toml", &(base + "\n[sweep]\n\"stages.train.learning_rate\" = [1e-3, 3e-3]\n"));
    std::fs::create_dir_all(p.path("remote")).unwrap();
    let url = format!("file://{}", p.path("remote").display());
    // Each "machine" has its own local cache; only the remote is shared.
    two_processes_split_the_sweep(&p, &["--cache-dir", &url], ["local-a", "local-b"]);
    let claims = std::fs::read_dir(p.path("remote/claims")).map_or(0, |d| d.count());
    assert_eq!(claims, 0, "claims are removed once their variant is done");
}

/// `--variant auto`: a task of an array job starts on the variant of its
/// scheduler's index and goes on to every unclaimed one; a later task finds
/// them finished. Without a scheduler's variable it says what it reads.
#[test]
fn array_job_tasks_start_on_their_own_variant() {
    let p = Project::new();
    let Some(base) = base_recipe(&p) else { return };
    p.write("sweep.toml", &(base + "\n[sweep]\n\"stages.train.learning_rate\" = [1e-3, 3e-3]\n"));
    // A command with no scheduler's variable but those given.
    let auto = || {
        let mut c = p.cmd(&["run", "sweep.toml", "--variant", "auto"]);
        for v in ["PIPELINE_VARIANT", "SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX", "SKYPILOT_NODE_RANK"] {
            c.env_remove(v);
        }
        c
    };
    let task = |var: &str, index: &str| {
        let out = auto().env(var, index).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        err
    };
    let first = task("SLURM_ARRAY_TASK_ID", "1");
    assert!(first.contains("Slurm array job task 1: variant 2 of 2 first"), "{first}");
    assert_eq!(ran(&first), [2, 1], "its own variant first, then the rest:\n{first}");
    // Index 2 of 2 variants wraps to the first; everything is finished.
    let second = task("JOB_COMPLETION_INDEX", "2");
    assert!(second.contains("Kubernetes Indexed Job task 2: variant 1 of 2 first"), "{second}");
    assert_eq!(ran(&second), Vec::<usize>::new(), "{second}");
    assert!(second.contains("variant 1 (learning_rate=0.001) is cached"), "{second}");
    let out = auto().output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("no scheduler set a task index") && err.contains("SLURM_ARRAY_TASK_ID"), "{err}");
}
