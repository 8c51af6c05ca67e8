//! `pipeline_data::hub` against a loopback server that answers as the
//! Hugging Face hub does: gated and missing repositories, a missing revision,
//! a refused token, no server at all, offline mode, and a download that
//! resumes from a partial file. Each case checks the message a user reads.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

use hf_hub::Cache;
use pipeline_data::hub::{Hub, HubRepo, TokenSource};

/// One request as the server saw it.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    headers: Vec<(String, String)>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// An answer: status, headers, body.
type Answer = (u16, Vec<(&'static str, String)>, Vec<u8>);

/// A loopback HTTP/1.1 server answering each request with `answer`; returns
/// its endpoint and the requests it saw.
fn serve(answer: impl Fn(&Seen) -> Answer + Send + Sync + 'static) -> (String, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let request = read_request(&stream);
            let Some(request) = request else { continue };
            log.lock().unwrap().push(request.clone());
            let (status, headers, body) = answer(&request);
            let mut out = stream;
            let mut head = format!(
                "HTTP/1.1 {status} {}\r\nContent-Length: {}\r\nConnection: close\r\n",
                reason(status),
                body.len()
            );
            for (k, v) in headers {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            head.push_str("\r\n");
            let _ = out.write_all(head.as_bytes());
            let _ = out.write_all(&body);
        }
    });
    (endpoint, seen)
}

fn read_request(stream: &TcpStream) -> Option<Seen> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let path = line.split_whitespace().nth(1)?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    Some(Seen { path, headers })
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        _ => "Error",
    }
}

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// The hub's `/api/models/ID/revision/REV` answer listing `files`.
fn info(id: &str, files: &[&str]) -> Answer {
    let siblings: Vec<String> = files.iter().map(|f| format!("{{\"rfilename\":\"{f}\"}}")).collect();
    let body = format!("{{\"id\":\"{id}\",\"sha\":\"{COMMIT}\",\"siblings\":[{}]}}", siblings.join(","));
    (200, vec![("Content-Type", "application/json".into())], body.into_bytes())
}

fn error(status: u16, code: Option<&str>, message: &str) -> Answer {
    let mut headers = vec![("X-Error-Message", message.to_string()), ("Content-Type", "application/json".into())];
    if let Some(code) = code {
        headers.push(("X-Error-Code", code.to_string()));
    }
    (status, headers, format!("{{\"error\":\"{message}\"}}").into_bytes())
}

fn hub(endpoint: &str, cache: &Path, token: Option<&str>) -> Hub {
    Hub {
        cache: Cache::new(cache.to_path_buf()),
        endpoint: endpoint.to_string(),
        token: token.map(str::to_string),
        token_source: if token.is_some() { TokenSource::Env } else { TokenSource::None },
        offline: false,
        progress: false,
    }
}

fn model(id: &str) -> HubRepo {
    HubRepo::parse_model(id).unwrap()
}

fn message(r: anyhow::Result<pipeline_data::hub::Snapshot>) -> String {
    let e = r.expect_err("the fetch should fail");
    let m = format!("{e:#}");
    println!("message: {m}");
    m
}

/// A cache holding `OWNER/NAME` at [`COMMIT`] with one `config.json`.
fn cached(cache: &Path, id: &str) {
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
    std::fs::create_dir_all(repo.join("snapshots").join(COMMIT)).unwrap();
    std::fs::write(repo.join("snapshots").join(COMMIT).join("config.json"), "{}").unwrap();
}

const GATED_MESSAGE: &str = "Access to model google/gemma-3-1b-it is restricted. You must have access to it and be authenticated to access it. Please log in.";

#[test]
fn a_gated_repository_without_a_token_names_the_licence_page_and_hf_token() {
    // The repository's listing is public; its files answer 401 GatedRepo.
    let (endpoint, seen) = serve(|r| {
        if r.path.starts_with("/api/models/") {
            info("google/gemma-3-1b-it", &["config.json", "model.safetensors"])
        } else {
            error(401, Some("GatedRepo"), GATED_MESSAGE)
        }
    });
    let cache = tempfile::tempdir().unwrap();
    let m = message(hub(&endpoint, cache.path(), None).fetch(&model("google/gemma-3-1b-it"), |_| true));
    assert!(
        m.contains("hf://google/gemma-3-1b-it is gated: the hub answered 401 to a request sent without a token"),
        "{m}"
    );
    assert!(m.contains(&format!("Accept its licence at {endpoint}/google/gemma-3-1b-it")), "{m}");
    assert!(m.contains("set HF_TOKEN (or run `huggingface-cli login`)"), "{m}");
    assert!(m.contains(GATED_MESSAGE), "the hub's own words are kept: {m}");
    assert!(!m.contains("cannot reach"), "the hub was reached: {m}");
    assert!(seen.lock().unwrap().iter().all(|r| r.header("authorization").is_none()));
}

#[test]
fn a_gated_repository_with_a_token_says_the_token_was_sent() {
    // The observation: the hub answers the listing itself with 401.
    let (endpoint, seen) = serve(|_| {
        error(
            403,
            Some("GatedRepo"),
            "Access to model google/gemma-3-1b-it is restricted and you are not in the authorized list.",
        )
    });
    let cache = tempfile::tempdir().unwrap();
    let m = message(hub(&endpoint, cache.path(), Some("hf_test")).fetch(&model("google/gemma-3-1b-it"), |_| true));
    assert!(m.contains("is gated: the hub answered 403 to a request sent with the token in HF_TOKEN"), "{m}");
    assert!(m.contains("as the user this token belongs to"), "{m}");
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0].header("authorization"), Some("Bearer hf_test"), "the token is sent as a bearer token");
}

#[test]
fn a_missing_repository_suggests_checking_the_id() {
    // Anonymous: the hub answers 401 RepoNotFound (it may be private).
    let (endpoint, _) = serve(|r| {
        let status = if r.header("authorization").is_some() { 404 } else { 401 };
        error(status, Some("RepoNotFound"), "Repository not found")
    });
    let cache = tempfile::tempdir().unwrap();
    let m = message(hub(&endpoint, cache.path(), None).fetch(&model("googel/gemma-3-1b-it"), |_| true));
    assert!(m.contains("hf://googel/gemma-3-1b-it was not found (or it is private): the hub answered 401"), "{m}");
    assert!(m.contains(&format!("Check the id (its page would be {endpoint}/googel/gemma-3-1b-it)")), "{m}");
    assert!(m.contains("for a private repository set HF_TOKEN"), "{m}");
    // With a token: 404.
    let m = message(hub(&endpoint, cache.path(), Some("hf_test")).fetch(&model("googel/gemma-3-1b-it"), |_| true));
    assert!(m.contains("was not found, or the token cannot see it: the hub answered 404 to a request sent with the token in HF_TOKEN"), "{m}");
    // A dataset's page is under /datasets/.
    let m = message(
        hub(&endpoint, cache.path(), None).fetch(&HubRepo::parse_dataset("datasets/nobody/nothing").unwrap(), |_| true),
    );
    assert!(m.contains(&format!("{endpoint}/datasets/nobody/nothing")), "{m}");
}

#[test]
fn a_missing_revision_is_reported_even_when_main_is_cached() {
    let (endpoint, _) = serve(|_| error(404, Some("RevisionNotFound"), "Invalid rev id: v9"));
    let cache = tempfile::tempdir().unwrap();
    cached(cache.path(), "google/gemma-3-270m");
    let m = message(hub(&endpoint, cache.path(), None).fetch(&model("google/gemma-3-270m@v9"), |_| true));
    assert!(m.contains("hf://google/gemma-3-270m@v9: the revision `v9` does not exist"), "{m}");
    assert!(m.contains("check the branch, tag or commit after `@`"), "{m}");
}

#[test]
fn a_refused_token_says_so() {
    let (endpoint, _) = serve(|_| error(401, None, "Invalid credentials in Authorization header"));
    let cache = tempfile::tempdir().unwrap();
    let m = message(hub(&endpoint, cache.path(), Some("hf_revoked")).fetch(&model("google/gemma-3-270m"), |_| true));
    assert!(m.contains("the hub refused the token (answered 401 to a request sent with the token in HF_TOKEN)"), "{m}");
    assert!(m.contains("https://huggingface.co/settings/tokens"), "{m}");
}

#[test]
fn no_server_falls_back_to_the_cache_and_says_so_when_the_cache_lacks_it() {
    // A port nothing listens on.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let cache = tempfile::tempdir().unwrap();
    let m = message(hub(&endpoint, cache.path(), None).fetch(&model("google/gemma-3-270m"), |_| true));
    assert!(m.contains(&format!("cannot reach the hub at {endpoint} for hf://google/gemma-3-270m")), "{m}");
    assert!(m.contains("the local cache cannot stand in"), "{m}");
    assert!(m.contains("point HF_HOME at a cache that holds it"), "{m}");
    assert!(!m.contains("HF_HUB_OFFLINE"), "{m}");
    cached(cache.path(), "google/gemma-3-270m");
    let snapshot = hub(&endpoint, cache.path(), None).fetch(&model("google/gemma-3-270m"), |_| true).unwrap();
    assert_eq!((snapshot.revision.as_str(), snapshot.files), (COMMIT, vec!["config.json".to_string()]));
}

#[test]
fn a_gated_answer_for_a_cached_revision_uses_the_cache() {
    // As huggingface_hub does: the files a user already has keep working.
    let (endpoint, _) = serve(|_| error(401, Some("GatedRepo"), GATED_MESSAGE));
    let cache = tempfile::tempdir().unwrap();
    cached(cache.path(), "google/gemma-3-1b-it");
    let snapshot = hub(&endpoint, cache.path(), None).fetch(&model("google/gemma-3-1b-it"), |_| true).unwrap();
    assert_eq!(snapshot.revision, COMMIT);
}

#[test]
fn offline_sends_no_request() {
    let (endpoint, seen) = serve(|r| info("google/gemma-3-270m", &[&r.path]));
    let cache = tempfile::tempdir().unwrap();
    let offline = Hub { offline: true, ..hub(&endpoint, cache.path(), None) };
    let m = message(offline.fetch(&model("google/gemma-3-270m"), |_| true));
    assert!(m.contains("hf://google/gemma-3-270m is not in the Hugging Face cache"), "{m}");
    assert!(m.contains("or unset HF_HUB_OFFLINE to download it"), "{m}");
    cached(cache.path(), "google/gemma-3-270m");
    assert_eq!(offline.fetch(&model("google/gemma-3-270m"), |_| true).unwrap().revision, COMMIT);
    assert!(seen.lock().unwrap().is_empty(), "offline mode must not touch the network");
}

#[test]
fn a_download_resumes_from_its_partial_file_into_the_hub_cache_layout() {
    let content: Vec<u8> = (0..10_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let etag = "5d41402abc4b2a76b9719d911017c592aaaaaaaa";
    let body = content.clone();
    let (endpoint, seen) = serve(move |r| {
        if r.path.starts_with("/api/models/") {
            return info("owner/tiny", &["model.safetensors"]);
        }
        let range = r.header("range").and_then(|v| v.strip_prefix("bytes=")).unwrap_or("0-");
        let (start, end) = range.split_once('-').unwrap();
        let start: usize = start.parse().unwrap();
        let end: usize = if end.is_empty() { body.len() - 1 } else { end.parse().unwrap() };
        let headers = vec![
            ("ETag", format!("\"{etag}\"")),
            ("X-Repo-Commit", COMMIT.to_string()),
            ("Content-Range", format!("bytes {start}-{end}/{}", body.len())),
        ];
        (206, headers, body[start..=end].to_vec())
    });
    let cache = tempfile::tempdir().unwrap();
    // A download killed midway left the first 12,345 bytes (as huggingface_hub names a partial blob).
    let blobs = cache.path().join("models--owner--tiny/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(blobs.join(format!("{etag}.incomplete")), &content[..12_345]).unwrap();

    let snapshot = hub(&endpoint, cache.path(), None).fetch(&model("owner/tiny"), |_| true).unwrap();
    assert_eq!(snapshot.revision, COMMIT);
    assert_eq!(snapshot.files, vec!["model.safetensors".to_string()]);
    assert_eq!(std::fs::read(snapshot.dir.join("model.safetensors")).unwrap(), content, "the resumed file is whole");
    let ranges: Vec<String> =
        seen.lock().unwrap().iter().filter_map(|r| r.header("range").map(str::to_string)).collect();
    assert!(ranges.contains(&"bytes=12345-".to_string()), "only the missing bytes are asked for: {ranges:?}");
    // The layout huggingface_hub reads: refs/main, snapshots/COMMIT/FILE -> blobs/ETAG.
    let repo = cache.path().join("models--owner--tiny");
    assert_eq!(std::fs::read_to_string(repo.join("refs/main")).unwrap(), COMMIT);
    let link = std::fs::read_link(repo.join("snapshots").join(COMMIT).join("model.safetensors")).unwrap();
    assert!(link.ends_with(Path::new("blobs").join(etag)), "{}", link.display());
    assert!(!blobs.join(format!("{etag}.incomplete")).exists());
}
