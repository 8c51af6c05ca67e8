//! Servers the tests start on loopback, killed on drop: moto's S3 API and a
//! WebDAV share (wsgidav), both installed by scripts/fetch-test-tools.sh.

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::Project;

/// A server on a free loopback port, killed on drop: moto's S3 API, or a
/// WebDAV share of a temporary directory.
pub struct Server {
    child: Child,
    pub port: u16,
    /// The shared directory of a WebDAV server (`None`: S3).
    webdav_root: Option<tempfile::TempDir>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

impl Server {
    /// Starts the server, or `None` when moto is not installed and skipping
    /// is allowed (`common::missing`).
    pub fn start() -> Option<Server> {
        Self::launch(false, &[])
    }

    /// moto checking every request's credentials against its (empty) IAM:
    /// every access key is refused.
    pub fn start_with_auth() -> Option<Server> {
        Self::launch(false, &[("INITIAL_NO_AUTH_ACTION_COUNT", "0")])
    }

    /// A WebDAV server (wsgidav) instead.
    pub fn start_webdav() -> Option<Server> {
        Self::launch(true, &[])
    }

    fn launch(webdav: bool, env: &[(&str, &str)]) -> Option<Server> {
        let (module, package) = if webdav {
            ("wsgidav.server.server_cli, cheroot", "wsgidav")
        } else {
            ("moto.server, flask", "moto[server]")
        };
        let have = Command::new("python3")
            .args(["-c", &format!("import {module}")])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !have {
            super::missing(
                &format!("{package} is not installed"),
                "run scripts/fetch-test-tools.sh (it pip-installs it)",
            );
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let root = webdav.then(|| tempfile::tempdir().unwrap());
        let mut cmd = Command::new("python3");
        match &root {
            Some(root) => cmd
                .args(["-m", "wsgidav.server.server_cli", "--host", "127.0.0.1", "--auth", "anonymous"])
                .args(["--port", &port.to_string(), "--root", root.path().to_str().unwrap()]),
            None => cmd.args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()]),
        };
        let child = cmd
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the server");
        let server = Server { child, port, webdav_root: root };
        let t0 = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t0.elapsed() < Duration::from_secs(60), "moto did not start on port {port}");
            std::thread::sleep(Duration::from_millis(200));
        }
        Some(server)
    }

    /// The remote-cache URL of `path` (bucket/prefix on S3).
    pub fn url(&self, path: &str) -> String {
        match self.webdav_root {
            Some(_) => format!("http://127.0.0.1:{}/{path}", self.port),
            None => format!("s3://{path}"),
        }
    }

    /// Creates a bucket (moto accepts unsigned requests).
    pub fn bucket(&self, name: &str) {
        use std::io::{Read, Write};
        if self.webdav_root.is_some() {
            return;
        }
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            s,
            "PUT /{name} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.1 200") || reply.starts_with("HTTP/1.0 200"), "create bucket: {reply}");
    }

    /// Every object key under `prefix` in `bucket` (boto3 comes with moto).
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let script = r#"
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], aws_access_key_id="test",
                  aws_secret_access_key="test", region_name="us-east-1")
for page in s3.get_paginator("list_objects_v2").paginate(Bucket=sys.argv[2], Prefix=sys.argv[3]):
    for o in page.get("Contents", []):
        print(o["Key"])
"#;
        let endpoint = format!("http://127.0.0.1:{}", self.port);
        let out = Command::new("python3").args(["-c", script, &endpoint, bucket, prefix]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
    }

    /// `pipeline` with this server as the remote cache and `local` as the
    /// local working copy.
    pub fn cmd(&self, p: &Project, url: &str, local: &Path, args: &[&str]) -> Command {
        let mut c = p.cmd(args);
        c.env("PIPELINE_CACHE_DIR", url)
            .env("PIPELINE_LOCAL_CACHE", local)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ENDPOINT", format!("http://127.0.0.1:{}", self.port))
            .env("AWS_ALLOW_HTTP", "true");
        c
    }
}
