//! The remote cache against real servers on loopback, installed by
//! scripts/fetch-test-tools.sh: an S3 API (moto's server mode) and WebDAV
//! (wsgidav). A killed cloud job restarted on a new machine (an empty local
//! cache, the same remote) resumes from the last checkpoint it pushed and
//! ends with the same adapter bytes as a run that was never interrupted; a
//! kill mid-upload never publishes an entry; concurrent jobs do not clobber
//! each other.

mod common;

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use common::servers::Server;
use common::{Project, chat_jsonl, models_dir, tiny_gemma3, train_recipe};

const TRAIN: &str = "rank = 4\nalpha = 8\ndropout = 0.1\nlearning_rate = 5e-3\nmax_steps = 6\n\
                     gradient_accumulation = 2\ncheckpoint_every = 2\nschedule = \"cosine\"\nwarmup_steps = 1\n\
                     gradient_checkpointing = true\n";

fn setup(models: &Path) -> Project {
    let p = Project::new();
    tiny_gemma3(models, &p.path("tiny"), 4096);
    p.write("data/train.jsonl", &chat_jsonl(12));
    p.write("r.toml", &train_recipe(&p.path("tiny"), TRAIN));
    p
}

fn ok(c: &mut Command) -> String {
    let out = c.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "pipeline failed:\n{stderr}");
    stderr
}

fn plan(s: &Server, p: &Project, url: &str, local: &Path) -> serde_json::Value {
    let out = s.cmd(p, url, local, &["plan", "r.toml", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn adapter(s: &Server, p: &Project, url: &str, local: &Path) -> Vec<u8> {
    let out = s.cmd(p, url, local, &["show", "r.toml", "train"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    std::fs::read(dir.join("adapter_model.safetensors")).unwrap()
}

#[test]
fn a_killed_cloud_job_resumes_on_a_new_machine_from_the_remote_checkpoint() {
    let Some(models) = models_dir() else { return };
    let Some(s3) = Server::start() else { return };
    kill_and_resume(&models, &s3);
}

#[test]
fn a_killed_job_resumes_from_a_webdav_remote_too() {
    let Some(models) = models_dir() else { return };
    let Some(dav) = Server::start_webdav() else { return };
    kill_and_resume(&models, &dav);
}

fn kill_and_resume(models: &Path, s3: &Server) {
    s3.bucket("cache");

    // The reference: one uninterrupted run with a plain local cache.
    let reference = setup(models);
    reference.ok(&["run", "r.toml"]);
    let out = reference.run(&["show", "r.toml", "train"]);
    let want =
        std::fs::read(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("adapter_model.safetensors"))
            .unwrap();

    // Machine 1: killed while uploading the checkpoint of step 4 (the one of
    // step 2 is on the remote, complete).
    let url = &s3.url("cache/jobs/tool-use");
    let p = setup(models);
    let local1 = p.path("machine-1");
    let out = s3
        .cmd(&p, url, &local1, &["run", "r.toml"])
        .env("PIPELINE_FAULT", "remote.mid-upload.step-000004")
        .output()
        .unwrap();
    assert!(!out.status.success(), "the job should have been killed: {}", String::from_utf8_lossy(&out.stderr));

    // Machine 2: a fresh disk, the same remote.
    std::fs::remove_dir_all(&local1).unwrap();
    let local2 = p.path("machine-2");
    let plan = plan(s3, &p, url, &local2);
    let stages = plan["stages"].as_array().unwrap();
    for s in &stages[..3] {
        assert_eq!(s["status"], "cached", "pushed as it finished: {s}");
    }
    assert_eq!(stages[3]["status"], "resume", "{}", stages[3]);
    assert_eq!(stages[3]["step"], 2, "the partial checkpoint of step 4 does not count: {}", stages[3]);
    let stderr = ok(&mut s3.cmd(&p, url, &local2, &["run", "r.toml"]));
    // Only what the resumed training reads is downloaded.
    assert!(stderr.contains("pulled  tokens"), "{stderr}");
    for stage in ["data", "chat"] {
        assert!(stderr.contains(&format!("remote  {stage}")), "{stderr}");
    }
    assert!(stderr.contains("ran     train"), "{stderr}");
    assert!(adapter(s3, &p, url, &local2) == want, "the resumed adapter differs from the uninterrupted one");

    // Machine 3: everything comes from the remote, verified, nothing runs.
    let local3 = p.path("machine-3");
    let stderr = ok(&mut s3.cmd(&p, url, &local3, &["run", "r.toml"]));
    assert!(!stderr.contains("ran "), "{stderr}");
    assert!(stderr.contains("pulled  train"), "{stderr}");
    assert!(adapter(s3, &p, url, &local3) == want);

    // `show` pulls a stage that `run` left in the remote.
    let local4 = p.path("machine-4");
    let out = s3.cmd(&p, url, &local4, &["show", "r.toml", "tokens"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(Path::new(String::from_utf8_lossy(&out.stdout).trim()).join("manifest.json").is_file());
}

#[test]
fn a_kill_mid_upload_publishes_no_entry() {
    let Some(models) = models_dir() else { return };
    let Some(s3) = Server::start() else { return };
    s3.bucket("cache");
    let url = "s3://cache/kill-mid-upload";
    let p = setup(&models);
    let local1 = p.path("machine-1");
    // Killed after the adapter was published locally, while pushing its
    // files: the remote must not show an entry for it.
    let out = s3
        .cmd(&p, url, &local1, &["run", "r.toml"])
        .env("PIPELINE_FAULT", "remote.mid-upload.lora-train")
        .output()
        .unwrap();
    assert!(!out.status.success());
    std::fs::remove_dir_all(&local1).unwrap();
    let local2 = p.path("machine-2");
    let plan = plan(&s3, &p, url, &local2);
    let train = &plan["stages"][3];
    assert_ne!(train["status"], "cached", "a half-uploaded entry must not count: {train}");
    // The checkpoints stay on the remote until the entry is published, so
    // the new machine resumes at the last step instead of training again.
    assert_eq!(train["status"], "resume", "{train}");
    assert_eq!(train["step"], 6, "{train}");
    let stderr = ok(&mut s3.cmd(&p, url, &local2, &["run", "r.toml"]));
    assert!(stderr.contains("ran     train"), "{stderr}");
    // Machine 1's half upload lies beside the published entry: the run
    // removed it, and only the published upload is left.
    assert!(stderr.contains("removed 1 abandoned upload"), "{stderr}");
    let key = train["key"].as_str().unwrap();
    let uploads: std::collections::BTreeSet<String> = s3
        .keys("cache", &format!("kill-mid-upload/entries/{key}/"))
        .iter()
        .filter_map(|k| k.split('/').nth(3).filter(|d| d.starts_with("upload-")).map(str::to_string))
        .collect();
    assert_eq!(uploads.len(), 1, "{uploads:?}");
    // Nothing left for `gc --remote` to remove.
    let out = s3.cmd(&p, url, &local2, &["gc", "--remote"]).output().unwrap();
    let gc = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && gc.contains("removed 0 abandoned uploads"), "{gc}");

    // Now published: a third machine pulls it.
    let local3 = p.path("machine-3");
    let plan3 = plan_of(&s3, &p, url, &local3);
    assert!(plan3.iter().all(|s| s == "cached"), "{plan3:?}");
}

fn plan_of(s3: &Server, p: &Project, url: &str, local: &Path) -> Vec<String> {
    plan(s3, p, url, local)["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["status"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn concurrent_jobs_on_one_remote_do_not_clobber_each_other() {
    let Some(models) = models_dir() else { return };
    let Some(s3) = Server::start() else { return };
    s3.bucket("cache");
    let url = "s3://cache/concurrent";
    let p = setup(&models);
    let short = ["run", "r.toml", "--set", "stages.train.max_steps=2"];
    let jobs: Vec<Child> = ["a", "b"]
        .iter()
        .map(|m| s3.cmd(&p, url, &p.path(m), &short).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap())
        .collect();
    for job in jobs {
        let out = job.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    // A third machine gets every stage from the remote, and it matches what
    // each job has locally.
    let stderr = ok(&mut s3.cmd(&p, url, &p.path("c"), &short));
    assert!(!stderr.contains("ran "), "{stderr}");
    let mut a = s3.cmd(&p, url, &p.path("a"), &["show", "r.toml", "train", "--set", "stages.train.max_steps=2"]);
    let mut c = s3.cmd(&p, url, &p.path("c"), &["show", "r.toml", "train", "--set", "stages.train.max_steps=2"]);
    let dir = |cmd: &mut Command| PathBuf::from(String::from_utf8_lossy(&cmd.output().unwrap().stdout).trim());
    let (da, dc) = (dir(&mut a), dir(&mut c));
    assert_eq!(
        std::fs::read(da.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(dc.join("adapter_model.safetensors")).unwrap()
    );
    // On the remote: per entry one manifest and exactly one upload directory
    // (the one it names: a job that lost the race deleted its own).
    let keys = s3.keys("cache", "concurrent/entries/");
    let mut uploads: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> = Default::default();
    for k in &keys {
        let parts: Vec<&str> = k.split('/').collect();
        if parts.len() > 4 {
            uploads.entry(parts[2].to_string()).or_default().insert(parts[3].to_string());
        }
    }
    assert_eq!(uploads.len(), 4, "data, chat, tokens, train: {keys:?}");
    for (key, dirs) in &uploads {
        assert_eq!(dirs.len(), 1, "entry {key}: {dirs:?}");
        assert!(keys.contains(&format!("concurrent/entries/{key}/manifest.json")));
    }
}

#[test]
fn large_files_go_to_s3_in_parts() {
    let Some(s3) = Server::start() else { return };
    s3.bucket("cache");
    let remote = pipeline_cache::Remote::open_with(
        "s3://cache/big",
        [
            ("aws_endpoint", format!("http://127.0.0.1:{}", s3.port)),
            ("aws_access_key_id", "test".into()),
            ("aws_secret_access_key", "test".into()),
            ("aws_region", "us-east-1".into()),
            ("aws_allow_http", "true".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
    )
    .unwrap();
    // A 70 MB "model" (three parts) in a checkpoint directory.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("checkpoints/step-000002");
    std::fs::create_dir_all(&dir).unwrap();
    let big: Vec<u8> = (0..70_000_000u32).map(|i| (i / 1000 % 253) as u8).collect();
    std::fs::write(dir.join("adapter.safetensors"), &big).unwrap();
    std::fs::write(dir.join("state.json"), "{}").unwrap();
    let key = pipeline_cache::CacheKey("e".repeat(64));
    remote.push_checkpoint(&key, &dir).unwrap();
    assert_eq!(remote.latest_checkpoint(&key).unwrap(), Some(2));
    let back = tmp.path().join("machine-2");
    std::fs::create_dir_all(&back).unwrap();
    remote.pull_latest_checkpoint(&key, &back).unwrap();
    assert!(std::fs::read(back.join("step-000002/adapter.safetensors")).unwrap() == big);
}

#[test]
fn a_missing_bucket_stops_the_run_before_any_work() {
    let Some(models) = models_dir() else { return };
    let Some(s3) = Server::start() else { return };
    let p = setup(&models);
    let local = p.path("machine-1");
    let t0 = Instant::now();
    let out = s3.cmd(&p, "s3://no-such-bucket/x", &local, &["run", "r.toml"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("missing bucket: failed after {:.2} s: {}", t0.elapsed().as_secs_f64(), stderr.trim());
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("s3://no-such-bucket/x cannot be read (the bucket does not exist")
            && stderr.contains("NoSuchBucket"),
        "{stderr}"
    );
    assert!(!stderr.contains("ran "), "nothing runs: {stderr}");
}

/// A loopback TCP proxy in front of a server that a test opens and closes.
/// Closed after `n` more requests, it forwards those and then cuts every
/// connection (the store "stops answering") until it is opened again.
struct Gate {
    port: u16,
    /// Requests still let through; negative: open.
    budget: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

impl Gate {
    fn new(target: u16) -> Gate {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let budget = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(-1));
        let shared = budget.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if shared.load(Ordering::SeqCst) == 0 {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else { continue };
                let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (mut s_in, mut c_out) = (server, client);
                let budget = shared.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 1 << 16];
                    while let Ok(n @ 1..) = c_in.read(&mut buf) {
                        // Each request starts with one request line.
                        let requests = buf[..n].windows(11).filter(|w| w == b" HTTP/1.1\r\n").count() as i64;
                        let pass = requests == 0
                            || budget
                                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| {
                                    if b < 0 {
                                        Some(b)
                                    } else if b >= requests {
                                        Some(b - requests)
                                    } else {
                                        None
                                    }
                                })
                                .is_ok();
                        if !pass || s_out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    c_in.shutdown(std::net::Shutdown::Both).ok();
                    s_out.shutdown(std::net::Shutdown::Both).ok();
                });
                std::thread::spawn(move || {
                    std::io::copy(&mut s_in, &mut c_out).ok();
                    c_out.shutdown(std::net::Shutdown::Both).ok();
                });
            }
        });
        Gate { port, budget }
    }

    /// Lets `n` more requests through, then none.
    fn close_after(&self, n: i64) {
        self.budget.store(n, std::sync::atomic::Ordering::SeqCst);
    }

    fn open(&self) {
        self.budget.store(-1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn an_outage_while_planning_never_restarts_a_training_that_has_a_remote_checkpoint() {
    let Some(models) = models_dir() else { return };
    let Some(s3) = Server::start() else { return };
    s3.bucket("cache");
    let gate = Gate::new(s3.port);
    let url = "s3://cache/outage";
    let p = setup(&models);
    let through_gate = |local: &Path, args: &[&str]| {
        let mut c = s3.cmd(&p, url, local, args);
        c.env("AWS_ENDPOINT", format!("http://127.0.0.1:{}", gate.port)).env("PIPELINE_REMOTE_RETRIES", "1");
        c
    };
    // Machine 1 is killed while uploading step 4: step 2 is on the remote.
    let local1 = p.path("machine-1");
    let out = through_gate(&local1, &["run", "r.toml"])
        .env("PIPELINE_FAULT", "remote.mid-upload.step-000004")
        .output()
        .unwrap();
    assert!(!out.status.success(), "the job should have been killed");
    std::fs::remove_dir_all(&local1).unwrap();

    // Machine 2 reaches the store (the probes before planning: a list, a
    // write and a delete), then the store stops answering while it plans:
    // it must stop, not plan the training as new.
    gate.close_after(3);
    let local2 = p.path("machine-2");
    let out = through_gate(&local2, &["run", "r.toml"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot ask the remote cache whether it is finished"), "{stderr}");
    assert!(!stderr.contains("ran "), "nothing runs while the remote is out of reach: {stderr}");
    println!("outage while planning: {}", stderr.lines().find(|l| l.contains("cannot ask")).unwrap_or_default());

    // The store answers again: the training resumes from step 2.
    gate.open();
    let stderr = ok(&mut through_gate(&local2, &["run", "r.toml"]));
    assert!(stderr.contains("resuming train from step 2"), "{stderr}");
    assert!(stderr.contains("ran     train"), "{stderr}");
}

#[test]
fn no_server_at_the_endpoint_fails_at_once_and_says_so() {
    let Some(models) = models_dir() else { return };
    let p = setup(&models);
    // A port nothing listens on.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let t0 = Instant::now();
    let out = p
        .cmd(&["run", "r.toml"])
        .env("PIPELINE_CACHE_DIR", "s3://cache/x")
        .env("PIPELINE_LOCAL_CACHE", p.path("local"))
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ENDPOINT", format!("http://127.0.0.1:{port}"))
        .env("AWS_ALLOW_HTTP", "true")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("connection refused at 127.0.0.1:{port}")), "{stderr}");
    assert!(!stderr.contains("not writable"), "the wrong advice: {stderr}");
    println!("no server: failed after {:.2} s: {}", t0.elapsed().as_secs_f64(), stderr.trim());
}

#[test]
fn refused_credentials_are_named_before_any_work() {
    let Some(models) = models_dir() else { return };
    let Some(s3) = Server::start_with_auth() else { return };
    let p = setup(&models);
    let t0 = Instant::now();
    let out = s3
        .cmd(&p, "s3://cache/x", &p.path("local"), &["run", "r.toml"])
        .env("PIPELINE_REMOTE_RETRIES", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("the store refused the credentials"), "{stderr}");
    assert!(!stderr.contains("ran "), "nothing runs: {stderr}");
    println!("refused credentials: failed after {:.2} s: {}", t0.elapsed().as_secs_f64(), stderr.trim());
}
