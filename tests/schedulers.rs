//! Sweeps under the schedulers people run them on, each from the file in
//! `examples/cluster/` a user would submit, against the loopback S3 server as
//! the shared cache:
//!
//! - Slurm, for real: Debian's `slurm-wlm` (`slurmctld`, `slurmd`) and
//!   `munge`, started here as a one-node cluster on loopback (as root, the
//!   way CI runs). `sweep.sbatch`, submitted as an array job of two tasks
//!   (each `pipeline run R --sweep … --variant auto`), runs a sweep of three
//!   variants: every variant trained exactly once, the stages the variants
//!   share computed once, the keys a one-machine plan's.
//! - A Kubernetes Indexed Job and a SkyPilot task: no cluster here, so each
//!   pod's (node's) command runs as written, with the environment and index
//!   the scheduler gives it, all at once.

mod common;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Project;
use common::servers::Server;

/// munged, slurmctld and slurmd in a scratch directory, stopped on drop.
struct Slurm {
    dir: tempfile::TempDir,
    daemons: Vec<Child>,
}

impl Drop for Slurm {
    fn drop(&mut self) {
        for d in &mut self.daemons {
            d.kill().ok();
            d.wait().ok();
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Slurm {
    /// The cluster, or `None` when Slurm is not installed and skipping is
    /// allowed (`common::missing`).
    fn start() -> Option<Slurm> {
        let have = |p: &str| {
            Command::new("sh").args(["-c", &format!("command -v {p}")]).output().is_ok_and(|o| o.status.success())
        };
        let missing: Vec<&str> =
            ["munged", "mungekey", "slurmctld", "slurmd", "sbatch", "sinfo"].into_iter().filter(|p| !have(p)).collect();
        if !missing.is_empty() {
            common::missing(
                &format!("{} not installed", missing.join(", ")),
                "run scripts/install-slurm.sh (Debian's slurm-wlm and munge)",
            );
            return None;
        }
        let uid = Command::new("id").arg("-u").output().unwrap();
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            common::missing("a Slurm cluster of our own needs root (slurmd starts jobs as their users)", "run as root");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for sub in ["munge", "state", "spool", "log"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        let key = d.join("munge/munge.key");
        run_ok(Command::new("mungekey").args(["-c", "-b", "1024", "-k"]).arg(&key));
        let socket = d.join("munge/munge.sock");
        let mut daemons = vec![];
        let mut munged = Command::new("munged");
        munged
            .args(["-F", "-f"])
            .arg(format!("--key-file={}", key.display()))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--pid-file={}", d.join("munge/munged.pid").display()))
            .arg(format!("--log-file={}", d.join("log/munged.log").display()))
            .arg(format!("--seed-file={}", d.join("munge/seed").display()));
        daemons.push(munged.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
        let mut slurm = Slurm { dir, daemons };
        wait_for(|| slurm.dir.path().join("munge/munge.sock").exists(), "munged's socket");

        let host =
            String::from_utf8_lossy(&Command::new("hostname").arg("-s").output().unwrap().stdout).trim().to_string();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let d = slurm.dir.path();
        let conf = format!(
            "ClusterName=pipelinetest\nSlurmctldHost={host}(127.0.0.1)\nSlurmctldPort={}\nSlurmdPort={}\n\
             AuthType=auth/munge\nAuthInfo=socket={}\nCredType=cred/munge\nSlurmUser=root\nSlurmdUser=root\n\
             StateSaveLocation={d}/state\nSlurmdSpoolDir={d}/spool\nSlurmctldPidFile={d}/slurmctld.pid\n\
             SlurmdPidFile={d}/slurmd.pid\nSlurmctldLogFile={d}/log/slurmctld.log\nSlurmdLogFile={d}/log/slurmd.log\n\
             ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nJobAcctGatherType=jobacct_gather/none\n\
             AccountingStorageType=accounting_storage/none\nSelectType=select/cons_tres\nSelectTypeParameters=CR_Core\n\
             SchedulerType=sched/builtin\nReturnToService=2\nMpiDefault=none\n\
             NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN\n\
             PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n",
            free_port(),
            free_port(),
            socket.display(),
            d = d.display(),
        );
        std::fs::write(slurm.conf(), conf).unwrap();
        for (daemon, extra) in [("slurmctld", vec![]), ("slurmd", vec!["-N".to_string(), host.clone()])] {
            let child = Command::new(daemon)
                .arg("-D")
                .arg("-f")
                .arg(slurm.conf())
                .args(extra)
                .env("SLURM_CONF", slurm.conf())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            slurm.daemons.push(child);
        }
        wait_for(
            || {
                let out = slurm.client("sinfo").args(["-h", "-o", "%T"]).output().unwrap();
                String::from_utf8_lossy(&out.stdout).trim() == "idle"
            },
            "the node to be idle in sinfo",
        );
        Some(slurm)
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("slurm.conf")
    }

    /// A Slurm client command (`sbatch`, `sinfo`, …) of this cluster.
    fn client(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SLURM_CONF", self.conf());
        c
    }

    fn logs(&self) -> String {
        let log = |f: &str| std::fs::read_to_string(self.dir.path().join("log").join(f)).unwrap_or_default();
        format!("slurmctld.log:\n{}\nslurmd.log:\n{}", log("slurmctld.log"), log("slurmd.log"))
    }
}

fn run_ok(c: &mut Command) -> String {
    let out = c.output().unwrap();
    assert!(out.status.success(), "{c:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_for(mut ready: impl FnMut() -> bool, what: &str) {
    let t0 = Instant::now();
    while !ready() {
        assert!(t0.elapsed() < Duration::from_secs(60), "waited a minute for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The tiny-model recipe of tests/sweep.rs.
fn sweep_recipe(p: &Project, models: &Path) -> String {
    common::tiny_gemma3(models, &p.path("model"), 4096);
    p.write("data/train.jsonl", &common::chat_jsonl(16));
    common::train_recipe(&p.path("model"), "max_steps = 3\nrank = 4\ncheckpoint_every = 1\n")
        + "\n[stages.eval]\nkind = \"evaluate\"\nconversations = \"chat\"\nadapter = \"train\"\n\
           compare = [\"base\", \"adapter\"]\n[stages.eval.generation]\nmax_new_tokens = 4\n"
}

/// Three learning rates.
const SWEEP: &str = "stages.train.learning_rate=1e-3,3e-3,1e-2";

/// stage name → key, per variant, from `plan --json`, and each stage's status.
fn planned(c: &mut Command) -> Vec<BTreeMap<String, (String, String)>> {
    let v: serde_json::Value = serde_json::from_str(&run_ok(c)).unwrap();
    v["variants"]
        .as_array()
        .expect("a sweep plans variants")
        .iter()
        .map(|var| {
            var["stages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| {
                    let field = |k: &str| s[k].as_str().unwrap().to_string();
                    (field("name"), (field("key"), field("status")))
                })
                .collect()
        })
        .collect()
}

#[test]
fn a_slurm_array_job_of_two_tasks_runs_a_three_variant_sweep_once_over_an_s3_cache() {
    let Some(models) = common::models_dir() else { return };
    let Some(s3) = Server::start() else { return };
    let Some(slurm) = Slurm::start() else { return };
    s3.bucket("cache");
    let p = Project::new();
    p.write("sweep.toml", &sweep_recipe(&p, &models));

    // examples/cluster/sweep.sbatch as a user submits it, with the tiny
    // recipe and this cluster's sizes on the command line.
    let mut sbatch = slurm.client("sbatch");
    let env = s3.cmd(&p, "s3://cache/sweep", &p.path("unused"), &[]);
    sbatch
        .envs(env.get_envs().filter_map(|(k, v)| Some((k, v?))))
        .env("PIPELINE_CACHE", "s3://cache/sweep")
        .env("PIPELINE", env!("CARGO_BIN_EXE_pipeline"))
        .env("RECIPE", "sweep.toml")
        .env("SWEEP", SWEEP)
        .env("TMPDIR", p.dir.path())
        .current_dir(p.dir.path())
        .args(["--wait", "--array=0-1", "--cpus-per-task=1", "--mem=0", "--output", "task-%a.log"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/cluster/sweep.sbatch"));
    let out = sbatch.output().unwrap();
    let logs: Vec<String> =
        (0..2).map(|i| std::fs::read_to_string(p.path(&format!("task-{i}.log"))).unwrap_or_default()).collect();
    assert!(
        out.status.success(),
        "sbatch --wait: {}\n{}\ntask 0:\n{}\ntask 1:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        logs[0],
        logs[1],
        slurm.logs()
    );
    let all = logs.join("\n");
    let count = |prefix: &str| all.lines().filter(|l| l.trim_start().starts_with(prefix)).count();

    // Each task started on its own index's variant; three trainings, one
    // per variant; the data stages they share ran once.
    assert!(logs[0].contains("pipeline: variant 1/3"), "task 0 starts on variant 1:\n{}", logs[0]);
    assert!(logs[1].contains("pipeline: variant 2/3"), "task 1 starts on variant 2:\n{}", logs[1]);
    assert_eq!(count("ran     train "), 3, "every variant trained once:\n{all}");
    for shared in ["data ", "chat ", "tokens "] {
        assert_eq!(count(&format!("ran     {shared}")), 1, "`{shared}` computed once:\n{all}");
    }

    // The keys are those one machine plans, and the S3 cache holds every
    // stage of every variant finished.
    let plan = ["plan", "sweep.toml", "--sweep", SWEEP, "--json"];
    let local = planned(p.cmd(&plan).env("PIPELINE_CACHE_DIR", p.path("one-machine")));
    let remote = planned(&mut s3.cmd(&p, "s3://cache/sweep", &p.path("fresh"), &plan));
    assert_eq!(local.len(), 3);
    for (v, (l, r)) in local.iter().zip(&remote).enumerate() {
        let keys = |m: &BTreeMap<String, (String, String)>| {
            m.iter().map(|(n, (k, _))| (n.clone(), k.clone())).collect::<Vec<_>>()
        };
        assert_eq!(keys(l), keys(r), "variant {}: keys", v + 1);
        for (stage, (_, status)) in r {
            assert_ne!(status, "run", "variant {}: `{stage}` is not finished in the S3 cache", v + 1);
        }
    }
}

/// A YAML file as JSON (PyYAML, which fetch-test-tools.sh's Python tools
/// bring along).
fn yaml(path: &str) -> serde_json::Value {
    let out = Command::new("python3")
        .args(["-c", "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))", path])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Runs `workers` at once, each with its own local cache; returns their
/// stderr, in order.
fn run_all(workers: Vec<Command>) -> Vec<String> {
    let children: Vec<_> =
        workers.into_iter().map(|mut c| c.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()).collect();
    children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(out.status.success(), "a worker failed:\n{err}");
            err
        })
        .collect()
}

/// Every variant trained once over all workers, and worker `i` started on
/// variant `i + 1`.
fn assert_sweep_ran_once(logs: &[String]) {
    let all = logs.join("\n");
    let trained = all.lines().filter(|l| l.trim_start().starts_with("ran     train ")).count();
    assert_eq!(trained, 3, "every variant trained once:\n{all}");
    for (i, log) in logs.iter().enumerate() {
        assert!(
            log.contains(&format!("pipeline: variant {}/3", i + 1)),
            "worker {i} starts on variant {}:\n{log}",
            i + 1
        );
    }
}

/// examples/cluster/sweep-indexed-job.yaml: each pod's command, environment
/// and completion index as Kubernetes gives them, with the tiny recipe in
/// place of the real one and the loopback S3 server as the cache.
#[test]
fn the_kubernetes_indexed_job_example_runs_each_variant_once() {
    let Some(models) = common::models_dir() else { return };
    let Some(s3) = Server::start() else { return };
    s3.bucket("cache");
    let p = Project::new();
    p.write("sweep.toml", &sweep_recipe(&p, &models));
    let job = yaml(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/cluster/sweep-indexed-job.yaml"));
    assert_eq!((job["kind"].as_str(), job["spec"]["completionMode"].as_str()), (Some("Job"), Some("Indexed")));
    let completions = job["spec"]["completions"].as_u64().unwrap();
    assert_eq!(completions, 3, "one pod per variant");
    let container = &job["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["command"], serde_json::json!(["pipeline"]));
    let mut args: Vec<String> =
        container["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().into()).collect();
    assert_eq!(args[0], "run");
    args[1] = "sweep.toml".into();
    let sweep = args.iter().position(|a| a == "--sweep").expect("the example sweeps") + 1;
    args[sweep] = SWEEP.into();
    let pods = (0..completions)
        .map(|index| {
            let mut c = s3.cmd(&p, "s3://cache/k8s", &p.path(&format!("pod-{index}")), &[]);
            for e in container["env"].as_array().unwrap() {
                let name = e["name"].as_str().unwrap();
                if name != "PIPELINE_CACHE_DIR" && name != "PIPELINE_LOCAL_CACHE" {
                    c.env(name, e["value"].as_str().unwrap());
                }
            }
            c.args(&args).env("JOB_COMPLETION_INDEX", index.to_string()).env("RAYON_NUM_THREADS", "1");
            c
        })
        .collect();
    assert_sweep_ran_once(&run_all(pods));
}

/// examples/cluster/sweep-skypilot.yaml: each node's `run` script, with
/// the task's `envs` and the node rank SkyPilot sets, the tiny recipe in
/// place of the real one and the loopback S3 server as the cache.
#[test]
fn the_skypilot_example_runs_each_variant_once() {
    let Some(models) = common::models_dir() else { return };
    let Some(s3) = Server::start() else { return };
    s3.bucket("cache");
    let p = Project::new();
    p.write("sweep.toml", &sweep_recipe(&p, &models));
    let task = yaml(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/cluster/sweep-skypilot.yaml"));
    let nodes = task["num_nodes"].as_u64().unwrap();
    assert_eq!(nodes, 3, "one node per variant");
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_pipeline")).parent().unwrap().to_path_buf();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let workers = (0..nodes)
        .map(|rank| {
            let home = p.path(&format!("node-{rank}"));
            std::fs::create_dir_all(&home).unwrap();
            let base = s3.cmd(&p, "s3://cache/skypilot", &home, &[]);
            let mut script = Command::new("bash");
            for (k, v) in base.get_envs() {
                match v {
                    Some(v) => script.env(k, v),
                    None => script.env_remove(k),
                };
            }
            for (k, v) in task["envs"].as_object().unwrap() {
                script.env(k, v.as_str().unwrap());
            }
            // The task's cache, on the loopback server.
            script.env("PIPELINE_CACHE_DIR", "s3://cache/skypilot");
            script
                .env("RECIPE", "sweep.toml")
                .env("SWEEP", SWEEP)
                .env("HOME", &home)
                .env("PATH", &path)
                .env("SKYPILOT_NODE_RANK", rank.to_string())
                .env("SKYPILOT_NUM_NODES", nodes.to_string())
                .env("RAYON_NUM_THREADS", "1")
                .current_dir(p.dir.path())
                .args(["-c", task["run"].as_str().unwrap()]);
            script
        })
        .collect();
    assert_sweep_ran_once(&run_all(workers));
}
