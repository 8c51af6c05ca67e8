//! `hf://` models and datasets online, against a real hub server on
//! loopback: olah (a self-hosted Hugging Face mirror, pip-installed by
//! scripts/fetch-test-tools.sh) serving local git repositories as hub repos
//! through `HF_ENDPOINT`. A tiny random Gemma 3 (real Qwen3 tokenizer files)
//! with a `v1` tag and a later commit, and the real tool-use dataset's
//! parquet files as a dataset repo.
//!
//! Shown: planning online fetches the small files but not the weights (the
//! stages are keyed on the hub's etag of them, the same offline later); a
//! recipe runs end to end online with `@v1` pinned (the adapter records
//! v1's commit, not main's); a half-written blob left by a killed
//! download is replaced by the whole file (olah's mirror ignores `Range`,
//! so the download starts over — the byte-range resume itself is tested
//! against a hub-like handler in `crates/data/tests/hub_answers.rs`);
//! `huggingface_hub` reads the cache we wrote (`scan_cache_dir`,
//! `hf_hub_download(local_files_only=True)`), and we read, offline, the
//! cache `huggingface_hub` wrote, with the same stage keys. And against a
//! hub-like server that honours `Range`: `pipeline fetch` killed halfway
//! through the weights resumes from the byte where it stopped.

mod common;

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Project;

const MODEL: &str = "pipeline-test/tiny-gemma3";
const DATASET: &str = "pipeline-test/tool-use";

/// olah on a free loopback port, killed on drop.
struct Olah {
    child: Child,
    endpoint: String,
}

impl Drop for Olah {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

impl Olah {
    fn start(dir: &Path) -> Option<Olah> {
        let have = Command::new("python3").args(["-c", "import olah.server"]).stderr(Stdio::null()).status();
        if !have.is_ok_and(|s| s.success()) {
            common::missing("olah is not installed", "run scripts/fetch-test-tools.sh (it pip-installs it)");
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let config = dir.join("olah.toml");
        std::fs::create_dir_all(dir.join("repos")).unwrap();
        std::fs::write(
            &config,
            format!(
                "[basic]\nhost = \"127.0.0.1\"\nport = {port}\nmirror-netloc = \"127.0.0.1:{port}\"\n\
                 mirror-lfs-netloc = \"127.0.0.1:{port}\"\nrepos-path = \"{}\"\nmirrors-path = [\"{}\"]\n\
                 [accessibility]\noffline = true\n",
                dir.join("repos").display(),
                dir.join("mirrors").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("olah.log")).unwrap();
        let child = Command::new("python3")
            .args(["-m", "olah.server", "-c", config.to_str().unwrap()])
            .current_dir(dir)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start olah");
        let olah = Olah { child, endpoint: format!("http://127.0.0.1:{port}") };
        let t0 = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t0.elapsed() < Duration::from_secs(90), "olah did not start on port {port}");
            std::thread::sleep(Duration::from_millis(250));
        }
        Some(olah)
    }
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "user.email=test@example.com", "-c", "user.name=test", "-c", "init.defaultBranch=main"])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The hub repositories olah serves: the model (tag `v1`, then a commit on
/// main that changes its config) and the dataset.
fn mirrors(root: &Path, models: &Path) -> (String, String) {
    let model = root.join("mirrors/models").join(MODEL);
    std::fs::create_dir_all(&model).unwrap();
    common::tiny_gemma3(models, &model, 512);
    git(&model, &["init", "-q"]);
    git(&model, &["add", "."]);
    git(&model, &["commit", "-qm", "tiny random Gemma 3"]);
    git(&model, &["tag", "v1"]);
    let v1 = git(&model, &["rev-parse", "HEAD"]);
    std::fs::write(model.join("README.md"), "---\nlicense: apache-2.0\n---\nA later commit.\n").unwrap();
    git(&model, &["add", "."]);
    git(&model, &["commit", "-qm", "card"]);
    let main = git(&model, &["rev-parse", "HEAD"]);

    let dataset = root.join("mirrors/datasets").join(DATASET);
    std::fs::create_dir_all(dataset.join("data")).unwrap();
    let snapshot = common::shared_dir()
        .join("hf/hub/datasets--shawhin--tool-use-finetuning/snapshots/0000000000000000000000000000000000000001/data");
    for split in ["train", "validation"] {
        let f = format!("{split}-00000-of-00001.parquet");
        std::fs::copy(snapshot.join(&f), dataset.join("data").join(&f)).unwrap();
    }
    git(&dataset, &["init", "-q"]);
    git(&dataset, &["add", "."]);
    git(&dataset, &["commit", "-qm", "data"]);
    (v1, main)
}

const RECIPE: &str = r#"[recipe]
name = "online"
seed = 3

[model]
base = "hf://pipeline-test/tiny-gemma3@v1"

[stages.data]
kind = "fetch-dataset"
source = "hf://datasets/pipeline-test/tool-use"
splits = ["train", "validation"]
keep = [{ where = { query_type = "easy" }, fraction = 0.05, splits = ["train"] }]

[stages.chat]
kind = "format-chat"
dataset = "data"
messages_column = "trace"
train_on = "first-assistant"

[stages.tokens]
kind = "tokenize"
conversations = "chat"
max_len = 512

[stages.train]
kind = "lora-train"
tokens = "tokens"
rank = 4
alpha = 8
max_steps = 2
eval_examples = 2
"#;

/// `pipeline ARGS` with the hub at `endpoint` and the cache in `hf_home`.
fn pipeline(p: &Project, hf_home: &Path, endpoint: Option<&str>, args: &[&str]) -> std::process::Output {
    let mut cmd = p.cmd(args);
    cmd.env("HF_HOME", hf_home).env_remove("HF_TOKEN").env_remove("HF_HUB_CACHE");
    match endpoint {
        Some(e) => cmd.env("HF_ENDPOINT", e).env_remove("HF_HUB_OFFLINE"),
        None => cmd.env("HF_HUB_OFFLINE", "1").env_remove("HF_ENDPOINT"),
    };
    cmd.output().unwrap()
}

fn ok(out: std::process::Output) -> String {
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "pipeline failed:\n{stdout}\n{stderr}");
    stdout.to_string()
}

/// `(stage, key, status)` of every stage, from `plan --json`.
fn plan(json: &str) -> Vec<(String, String, String)> {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().into(),
                s["key"].as_str().unwrap().into(),
                s["status"].as_str().unwrap().into(),
            )
        })
        .collect()
}

#[test]
fn an_online_recipe_runs_against_a_hub_server_and_shares_its_cache_with_huggingface_hub() {
    let Some(models) = common::models_dir() else { return };
    let root = tempfile::tempdir().unwrap();
    let (v1, main) = mirrors(root.path(), &models);
    let Some(olah) = Olah::start(root.path()) else { return };
    let p = Project::new();
    p.write("online.toml", RECIPE);
    let hf_home = p.path("hf");

    // A killed download left half a blob, and not even the right bytes.
    let weights = root.path().join("mirrors/models").join(MODEL).join("model.safetensors");
    let etag = git(weights.parent().unwrap(), &["hash-object", "model.safetensors"]);
    let blobs = hf_home.join("hub/models--pipeline-test--tiny-gemma3/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let size = std::fs::metadata(&weights).unwrap().len() as usize;
    std::fs::write(blobs.join(format!("{etag}.incomplete")), vec![0u8; size / 2]).unwrap();

    // Planning online downloads the small files, not the weights: stages
    // are keyed on the hub's identity of them.
    let planned = plan(&ok(pipeline(&p, &hf_home, Some(&olah.endpoint), &["plan", "--json", "online.toml"])));
    assert!(!blobs.join(&etag).exists(), "plan must not download the weights");
    assert_eq!(std::fs::metadata(blobs.join(format!("{etag}.incomplete"))).unwrap().len() as usize, size / 2);
    assert!(hf_home.join("hub/models--pipeline-test--tiny-gemma3/snapshots").join(&v1).join("config.json").exists());

    ok(pipeline(&p, &hf_home, Some(&olah.endpoint), &["run", "online.toml"]));
    assert_eq!(std::fs::read(blobs.join(&etag)).unwrap(), std::fs::read(&weights).unwrap(), "the blob is whole");
    assert!(!blobs.join(format!("{etag}.incomplete")).exists());

    // `@v1` is what was trained on, not main.
    let train = ok(pipeline(&p, &hf_home, None, &["show", "online.toml", "train"]));
    let adapter: serde_json::Value =
        serde_json::from_slice(&std::fs::read(Path::new(train.trim()).join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(adapter["revision"], v1.as_str(), "main is {main}");
    let refs = hf_home.join("hub/models--pipeline-test--tiny-gemma3/refs");
    assert_eq!(std::fs::read_to_string(refs.join("v1")).unwrap(), v1);

    // Offline, the same recipe is wholly cached.
    let ours = plan(&ok(pipeline(&p, &hf_home, None, &["plan", "--json", "online.toml"])));
    assert_eq!(ours.len(), 4, "{ours:?}");
    assert!(ours.iter().all(|(_, _, status)| status == "cached"), "{ours:?}");
    let key = |v: &[(String, String, String)]| v.iter().map(|(n, k, _)| (n.clone(), k.clone())).collect::<Vec<_>>();
    assert_eq!(key(&planned), key(&ours), "online before the download and offline after it: the same keys");

    // huggingface_hub reads our cache, and writes one we read.
    let theirs_home = p.path("hf-theirs");
    let script = r#"
import os, sys
from huggingface_hub import scan_cache_dir, hf_hub_download, snapshot_download
ours, theirs, endpoint, v1 = sys.argv[1:5]
info = scan_cache_dir(ours + "/hub")
repos = {(r.repo_type, r.repo_id): r for r in info.repos}
model = repos[("model", "pipeline-test/tiny-gemma3")]
assert v1 in {r.commit_hash for r in model.revisions}, model.revisions
assert "v1" in {ref for r in model.revisions for ref in r.refs}, model.revisions
assert ("dataset", "pipeline-test/tool-use") in repos, repos.keys()
assert not info.warnings, info.warnings
path = hf_hub_download("pipeline-test/tiny-gemma3", "model.safetensors", revision="v1",
                       cache_dir=ours + "/hub", local_files_only=True)
assert os.path.getsize(path) > 0
snapshot_download("pipeline-test/tiny-gemma3", revision="v1", cache_dir=theirs + "/hub", endpoint=endpoint)
snapshot_download("pipeline-test/tool-use", repo_type="dataset", cache_dir=theirs + "/hub", endpoint=endpoint)
print("ok", len(model.revisions))
"#;
    let out = common::python_check(
        "huggingface_hub",
        script,
        &[hf_home.to_str().unwrap(), theirs_home.to_str().unwrap(), &olah.endpoint, &v1],
    );
    if out.is_some() {
        let theirs = plan(&ok(pipeline(&p, &theirs_home, None, &["plan", "--json", "online.toml"])));
        assert_eq!(key(&theirs), key(&ours), "the same files give the same keys, whoever downloaded them");
    }
}

/// A hub-like server on loopback for one model, `owner/big`, whose weights
/// download stalls halfway until `stall` is cleared, and which honours
/// `Range` (as the hub's CDN does). Returns the endpoint and the `Range`
/// headers of the weights requests it saw.
fn stalling_hub(
    weights: std::sync::Arc<Vec<u8>>,
    stall: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader, Write};
    const COMMIT: &str = "c0ffee0000000000000000000000000000000001";
    const ETAG: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let ranges = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = ranges.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (weights, stall, seen) = (weights.clone(), stall.clone(), seen.clone());
            std::thread::spawn(move || {
                let mut reader = BufReader::new(&stream);
                let mut line = String::new();
                reader.read_line(&mut line).ok();
                let mut parts = line.split_whitespace();
                let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
                let mut range = None;
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                        break;
                    }
                    if let Some((k, v)) = h.split_once(':') {
                        if k.eq_ignore_ascii_case("range") {
                            range = Some(v.trim().to_string());
                        }
                    }
                }
                let mut out = &stream;
                if path.starts_with("/api/models/owner/big") {
                    let body = format!(
                        r#"{{"id":"owner/big","sha":"{COMMIT}","siblings":[{{"rfilename":"config.json"}},{{"rfilename":"model.safetensors"}}]}}"#
                    );
                    let _ = write!(
                        out,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    return;
                }
                let (body, etag): (Vec<u8>, &str) = if path.ends_with("/config.json") {
                    (br#"{"model_type":"gemma3_text"}"#.to_vec(), "0123456789abcdef0123456789abcdef01234567")
                } else if path.ends_with("/model.safetensors") {
                    (weights.to_vec(), ETAG)
                } else {
                    let _ = write!(out, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                    return;
                };
                let head = format!("ETag: \"{etag}\"\r\nX-Repo-Commit: {COMMIT}\r\nConnection: close\r\n");
                if method == "HEAD" {
                    let _ = write!(out, "HTTP/1.1 200 OK\r\n{head}Content-Length: {}\r\n\r\n", body.len());
                    return;
                }
                if etag == ETAG {
                    seen.lock().unwrap().push(range.clone().unwrap_or_default());
                }
                let start: usize = range
                    .as_deref()
                    .and_then(|r| r.strip_prefix("bytes="))
                    .and_then(|r| r.split('-').next())
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let status = if range.is_some() { "206 Partial Content" } else { "200 OK" };
                let _ = write!(
                    out,
                    "HTTP/1.1 {status}\r\n{head}Content-Length: {}\r\nContent-Range: bytes {start}-{}/{}\r\n\r\n",
                    body.len() - start,
                    body.len() - 1,
                    body.len()
                );
                if etag == ETAG && stall.load(std::sync::atomic::Ordering::SeqCst) {
                    // Half the file, then nothing: the client waits until it is killed.
                    let _ = out.write_all(&body[start..body.len() / 2]);
                    let _ = out.flush();
                    std::thread::sleep(Duration::from_secs(600));
                    return;
                }
                let _ = out.write_all(&body[start..]);
            });
        }
    });
    (endpoint, ranges)
}

#[test]
fn a_download_killed_midway_resumes_from_where_it_stopped() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let weights: Arc<Vec<u8>> = Arc::new((0..4_000_000u32).map(|i| (i * 7 % 251) as u8).collect());
    let stall = Arc::new(AtomicBool::new(true));
    let (endpoint, ranges) = stalling_hub(weights.clone(), stall.clone());
    let p = Project::new();
    p.write("data.jsonl", "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n");
    p.write(
        "fetch.toml",
        "[recipe]\nname = \"fetch\"\n\n[model]\nbase = \"hf://owner/big\"\n\n\
         [stages.data]\nkind = \"fetch-dataset\"\nsource = \"data.jsonl\"\n",
    );
    let hf_home = p.path("hf");
    let partial = hf_home.join(
        "hub/models--owner--big/blobs/9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08.incomplete",
    );

    // `pipeline fetch`, killed once half the weights are on disk.
    let mut cmd = p.cmd(&["fetch", "fetch.toml"]);
    cmd.env("HF_HOME", &hf_home).env("HF_ENDPOINT", &endpoint).env_remove("HF_HUB_OFFLINE").env_remove("HF_TOKEN");
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let t0 = Instant::now();
    while std::fs::metadata(&partial).map_or(0, |m| m.len()) < weights.len() as u64 / 2 {
        assert!(t0.elapsed() < Duration::from_secs(120), "the download did not start");
        assert!(child.try_wait().unwrap().is_none(), "fetch ended before it was killed");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(std::fs::metadata(&partial).unwrap().len(), weights.len() as u64 / 2);

    // Run again: only the missing half is asked for, and the file is whole.
    stall.store(false, Ordering::SeqCst);
    let mut cmd = p.cmd(&["fetch", "fetch.toml"]);
    cmd.env("HF_HOME", &hf_home).env("HF_ENDPOINT", &endpoint).env_remove("HF_HUB_OFFLINE").env_remove("HF_TOKEN");
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(*ranges.lock().unwrap(), vec![String::new(), format!("bytes={}-", weights.len() / 2)]);
    let snapshot = hf_home.join("hub/models--owner--big/snapshots/c0ffee0000000000000000000000000000000001");
    assert_eq!(std::fs::read(snapshot.join("model.safetensors")).unwrap(), *weights);
    assert!(!partial.exists());
    // And offline, the recipe's model resolves from the cache alone.
    let mut cmd = p.cmd(&["fetch", "fetch.toml"]);
    cmd.env("HF_HOME", &hf_home).env("HF_HUB_OFFLINE", "1");
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(ranges.lock().unwrap().len(), 2, "offline sends nothing");
}
