//! Helpers shared by the integration tests: a scratch project directory, the
//! `pipeline` binary with an offline environment, and the real artifacts
//! (`../shared`, the provisioned `models/`).
#![allow(dead_code)]

pub mod servers;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `../shared`, what a test needs that is not provisioned, the provisioned
/// `models/`: the same helpers as the library crates' tests.
#[allow(unused_imports)]
pub use pipeline_model::testing::{missing, models_dir, shared_dir};

/// A scratch directory holding recipes, data and a cache.
pub struct Project {
    pub dir: tempfile::TempDir,
}

impl Project {
    pub fn new() -> Project {
        Project { dir: tempfile::tempdir().unwrap() }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, contents: &str) -> PathBuf {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, contents).unwrap();
        p
    }

    /// `pipeline ARGS…` in this directory, offline, with `--cache-dir` set
    /// through the environment.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_pipeline"));
        c.args(args)
            .current_dir(self.dir.path())
            .env("HF_HOME", shared_dir().join("hf"))
            .env("HF_HUB_OFFLINE", "1")
            .env("PIPELINE_CACHE_DIR", self.path(".pipeline"))
            .env("PIPELINE_PROGRESS", "0")
            .env("RUST_LOG", "warn")
            .env_remove("PIPELINE_FAULT")
            .env_remove("PIPELINE_PAUSE");
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Runs and asserts success, returning stderr.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "pipeline {args:?} failed:\n{stderr}");
        stderr
    }

    /// `plan --json` as (name, status, reason) triples.
    pub fn plan(&self, args: &[&str]) -> Vec<(String, String, String)> {
        let mut full = vec!["plan", "--json"];
        full.extend_from_slice(args);
        let out = self.run(&full);
        assert!(out.status.success(), "plan failed: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["name"].as_str().unwrap().to_string(),
                    s["status"].as_str().unwrap().to_string(),
                    s["reason"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    /// The entries in the cache's store.
    pub fn store_entries(&self) -> Vec<String> {
        match std::fs::read_dir(self.path(".pipeline/store")) {
            Ok(rd) => rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect(),
            Err(_) => vec![],
        }
    }
}

/// A small tool-use-style jsonl dataset in the messages shape.
pub fn chat_jsonl(n: usize) -> String {
    (0..n)
        .map(|i| {
            serde_json::json!({
                "messages": [
                    {"role": "user", "content": format!("What is {i} plus {i}?")},
                    {"role": "assistant", "content": format!("<tool_call>{{\"tool_name\": \"add\", \"args\": {{\"a\": {i}, \"b\": {i}}}}}</tool_call>")}
                ],
                "kind": if i % 2 == 0 { "even" } else { "odd" },
            })
            .to_string()
                + "\n"
        })
        .collect()
}

/// A recipe over local data with the Qwen3 tokenizer (small, loads fast).
pub fn local_recipe(models: &Path, data: &str, extra_tokenize: &str) -> String {
    format!(
        r#"[recipe]
name = "local"

[model]
base = "{}"

[stages.data]
kind = "fetch-dataset"
source = "{data}"

[stages.chat]
kind = "format-chat"
dataset = "data"

[stages.tokens]
kind = "tokenize"
conversations = "chat"
{extra_tokenize}
"#,
        models.join("qwen3-tokenizer").display()
    )
}

/// A tiny random Gemma 3 in HF layout with the Qwen3 tokenizer, in `dir`.
pub fn tiny_gemma3(models: &Path, dir: &Path, max_positions: usize) {
    let mut tiny = pipeline_model::testing::TinyGemma3::new(151_936);
    tiny.max_positions = max_positions;
    tiny.write(dir, &models.join("qwen3-tokenizer"), 7).unwrap();
}

/// A recipe training a LoRA on the tiny model over `data/train.jsonl`.
pub fn train_recipe(model_dir: &Path, train: &str) -> String {
    format!(
        r#"[recipe]
name = "train"
seed = 3

[model]
base = "{}"
chat_template = "chatml"

[stages.data]
kind = "fetch-dataset"
source = "data/train.jsonl"
validation_fraction = 0.25

[stages.chat]
kind = "format-chat"
dataset = "data"

[stages.tokens]
kind = "tokenize"
conversations = "chat"
max_len = 64

[stages.train]
kind = "lora-train"
tokens = "tokens"
{train}
"#,
        model_dir.display()
    )
}

/// Perplexity of `m` on `../shared/reference/ppl_text.txt` as
/// `llama-perplexity -c 256` computes it (Gemma's BOS, id 2).
pub fn llama_cpp_perplexity(m: &dyn pipeline_model::CausalLm, tok: &tokenizers::Tokenizer) -> (f64, usize) {
    let text = std::fs::read_to_string(shared_dir().join("reference/ppl_text.txt")).unwrap();
    let mut tokens = vec![2u32];
    tokens.extend(tok.encode(text.as_str(), false).unwrap().get_ids());
    pipeline_model::testing::chunked_perplexity(m, &tokens, 2, 256).unwrap()
}

/// Runs a Python `script` (with `args` as `sys.argv[1:]`) that checks one of
/// our files with a reader nobody here wrote (the `gguf`, `safetensors` or
/// `transformers` package), and returns what it printed; `None` when the
/// package `module` is missing and skipping is allowed ([`missing`]). A
/// script that fails is a failed test.
pub fn python_check(module: &str, script: &str, args: &[&str]) -> Option<String> {
    let out = match Command::new("python3").arg("-c").arg(script).args(args).output() {
        Ok(out) => out,
        Err(e) => {
            missing(&format!("python3 cannot run ({e})"), "install Python 3");
            return None;
        }
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && stderr.contains(&format!("No module named '{module}'")) {
        missing(&format!("the {module} Python package is not installed"), "run scripts/fetch-test-tools.sh");
        return None;
    }
    assert!(out.status.success(), "the Python {module} package rejects our file:\n{stderr}");
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A llama.cpp program (`llama-tokenize`, `llama-server`, …) from the build
/// `scripts/fetch-test-tools.sh` makes (`scripts/build-llama-cpp.sh`, recorded
/// in `models/llama-cpp-bin`), or `PIPELINE_LLAMA_CPP_BIN`; `None` when it
/// is missing and skipping is allowed ([`missing`]).
pub fn llama_cpp(program: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("PIPELINE_LLAMA_CPP_BIN").map(PathBuf::from).or_else(|| {
        let recorded = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/llama-cpp-bin");
        std::fs::read_to_string(recorded).ok().map(|s| PathBuf::from(s.trim()))
    });
    let bin = dir.map(|d| d.join(program)).filter(|b| b.is_file());
    if bin.is_none() {
        missing(
            &format!("llama.cpp's {program} is not built"),
            "run scripts/fetch-test-tools.sh (it builds llama.cpp)",
        );
    }
    bin
}

/// llama.cpp's converter (`convert_hf_to_gguf.py`) in the source tree the
/// programs of [`llama_cpp`] were built from (`scripts/build-llama-cpp.sh`
/// links it beside them); `None` when it is missing and skipping is allowed.
pub fn llama_cpp_converter() -> Option<PathBuf> {
    let bin = llama_cpp("llama-quantize")?;
    let script = bin.parent().and_then(Path::parent).map(|prefix| prefix.join("src/convert_hf_to_gguf.py"));
    let script = script.filter(|s| s.is_file());
    if script.is_none() {
        missing("llama.cpp's convert_hf_to_gguf.py is not beside its programs", "run scripts/fetch-test-tools.sh");
    }
    script
}

/// The Python of the PyTorch + transformers + PEFT environment that
/// `scripts/fetch-test-tools.sh` installs (`scripts/install-torch.sh`, recorded
/// in `models/torch-python`), or `PIPELINE_TORCH_PYTHON`; `None` when it is
/// missing and skipping is allowed ([`missing`]).
pub fn torch_python() -> Option<PathBuf> {
    let python = std::env::var_os("PIPELINE_TORCH_PYTHON").map(PathBuf::from).or_else(|| {
        let recorded = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/torch-python");
        std::fs::read_to_string(recorded).ok().map(|s| PathBuf::from(s.trim()))
    });
    let python = python.filter(|p| p.is_file());
    if python.is_none() {
        missing(
            "PyTorch, transformers and PEFT are not installed",
            "run scripts/fetch-test-tools.sh (scripts/install-torch.sh)",
        );
    }
    python
}

/// Go (`go`, or `PIPELINE_GO`), which runs Go's own text/template to render
/// Ollama templates (`tests/ollama/render.go`); `scripts/fetch-test-tools.sh`
/// installs it. `None` when it is missing and skipping is allowed.
pub fn go() -> Option<PathBuf> {
    let go = std::env::var_os("PIPELINE_GO").map(PathBuf::from).or_else(|| {
        let out = Command::new("sh").args(["-c", "command -v go"]).output().ok()?;
        out.status.success().then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    });
    if go.is_none() {
        missing("Go is not installed", "run scripts/fetch-test-tools.sh (it installs Debian's golang-go)");
    }
    go
}

/// The tool-use dataset's validation rows as native tool-use conversations
/// (OpenAI tools, calls and `tool` results; every turn kept), formatted by
/// `format-chat` with the `gemma-tools` template: (messages, tools) pairs.
pub fn native_tool_conversations(models: &Path) -> Vec<(serde_json::Value, serde_json::Value)> {
    let p = Project::new();
    p.write(
        "r.toml",
        &format!(
            "[recipe]\nname = \"native\"\n[model]\nbase = \"{}\"\nchat_template = \"gemma-tools\"\n\
             [stages.data]\nkind = \"fetch-dataset\"\nsource = \"hf://datasets/shawhin/tool-use-finetuning\"\n\
             splits = [\"validation\"]\n[stages.chat]\nkind = \"format-chat\"\ndataset = \"data\"\n\
             messages_column = \"trace\"\ntool_format = \"native\"\n",
            models.join("gemma-3-270m").display()
        ),
    );
    p.ok(&["run", "r.toml"]);
    let out = p.run(&["show", "r.toml", "chat"]);
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    std::fs::read_to_string(dir.join("conversations/validation.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let c: serde_json::Value = serde_json::from_str(l).unwrap();
            (c["messages"].clone(), c["tools"].clone())
        })
        .collect()
}

/// A `llama-server` on a free loopback port, stopped when dropped.
pub struct Server {
    child: std::process::Child,
    port: u16,
}

impl Server {
    pub fn start(bin: &Path, args: &[&str]) -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = std::process::Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "-t", "2", "-c", "4096", "--log-disable"])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let server = Server { child, port };
        let t0 = std::time::Instant::now();
        while t0.elapsed() < std::time::Duration::from_secs(120) {
            if server.get("/health").is_some_and(|(status, _)| status == 200) {
                return server;
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
        panic!("llama-server {args:?} did not become healthy in 120 s");
    }

    pub fn request(&self, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(900))).ok()?;
        use std::io::{BufRead, Read, Write};
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        )
        .ok()?;
        let mut reader = std::io::BufReader::new(s);
        let mut status = String::new();
        reader.read_line(&mut status).ok()?;
        let code = status.split_whitespace().nth(1)?.parse().ok()?;
        let mut rest = String::new();
        reader.read_to_string(&mut rest).ok()?;
        let body = rest.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_string());
        Some((code, body))
    }

    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        self.request("GET", path, "")
    }

    pub fn post(&self, path: &str, body: &serde_json::Value) -> serde_json::Value {
        let (code, text) = self.request("POST", path, &body.to_string()).expect("llama-server answers");
        assert_eq!(code, 200, "POST {path}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("POST {path}: {e}: {text}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
