//! Real git servers on loopback for the agent's SSH and HTTPS transports: OpenSSH's `sshd`
//! running `git-upload-pack`, and git's own `git http-backend` behind a small TLS front.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::fixtures::Repo;

fn wait_listening(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn keygen(path: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "nk3-test", "-f"])
        .arg(path)
        .output()
        .expect("ssh-keygen (openssh-client)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(path.with_extension("pub")).unwrap()
}

/// `sshd` on a loopback port that lets in one client key, as the user running the tests.
pub struct SshServer {
    child: Child,
    _dir: tempfile::TempDir,
    /// The port.
    pub port: u16,
    /// The client's private key (the agent's deploy key).
    pub client_key: PathBuf,
    /// A known_hosts file listing the server's key.
    pub known_hosts: PathBuf,
    /// The user to log in as.
    pub user: String,
}

impl SshServer {
    /// Starts sshd; the repository is reached at `ssh://user@127.0.0.1:port/<path>`.
    pub fn start() -> SshServer {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let host_pub = keygen(&d.join("host_key"));
        let client_pub = keygen(&d.join("client_key"));
        std::fs::write(d.join("authorized_keys"), &client_pub).unwrap();
        let port = nk3_controlplane::unused_port();
        let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_string();
        let key_text: Vec<&str> = host_pub.split_whitespace().take(2).collect();
        let known_hosts = d.join("known_hosts");
        std::fs::write(
            &known_hosts,
            format!("[127.0.0.1]:{port} {}\n", key_text.join(" ")),
        )
        .unwrap();
        let config = d.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {host}\nPidFile none\n\
                 AuthorizedKeysFile {keys}\nStrictModes no\nUsePAM no\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 PermitRootLogin prohibit-password\nAllowUsers {user}\n",
                host = d.join("host_key").display(),
                keys = d.join("authorized_keys").display(),
            ),
        )
        .unwrap();
        // sshd wants its privilege-separation directory.
        let _ = std::fs::create_dir_all("/run/sshd");
        // sshd must be started by its absolute path.
        let sshd = std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .map(|d| d.join("sshd"))
            .find(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("/usr/sbin/sshd"));
        let child = Command::new(sshd)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sshd (openssh-server, installed by scripts/deps)");
        wait_listening(port, "sshd");
        SshServer {
            child,
            port,
            client_key: d.join("client_key"),
            known_hosts,
            user,
            _dir: dir,
        }
    }

    /// The ssh:// URL of `repo`.
    pub fn url(&self, repo: &Repo) -> String {
        format!(
            "ssh://{}@127.0.0.1:{}{}",
            self.user,
            self.port,
            repo.bare.display()
        )
    }

    /// A known_hosts file that lists another key for the server.
    pub fn wrong_known_hosts(&self) -> PathBuf {
        let other = keygen(&self._dir.path().join("impostor"));
        let key_text: Vec<&str> = other.split_whitespace().take(2).collect();
        let path = self._dir.path().join("wrong_known_hosts");
        std::fs::write(
            &path,
            format!("[127.0.0.1]:{} {}\n", self.port, key_text.join(" ")),
        )
        .unwrap();
        path
    }

    /// A key the server does not let in.
    pub fn stranger_key(&self) -> PathBuf {
        let path = self._dir.path().join("stranger");
        keygen(&path);
        path
    }
}

impl Drop for SshServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `git http-backend` behind HTTPS, with a certificate of its own CA; with a token set,
/// every request must carry it as the Basic password.
pub struct HttpsServer {
    /// The port.
    pub port: u16,
    /// The CA certificate the agent must trust (PEM file).
    pub ca_file: PathBuf,
    /// Requests answered, as "METHOD path-and-query STATUS".
    pub log: Arc<std::sync::Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl HttpsServer {
    /// Serves the repositories under `root`; `token`, when set, is required.
    pub fn serve(root: &Path, token: Option<&str>) -> HttpsServer {
        HttpsServer::start(root, token, None)
    }

    /// Answers every request with a redirect to the same path under `base`.
    pub fn redirecting(base: &str) -> HttpsServer {
        HttpsServer::start(Path::new("/nonexistent"), None, Some(base.to_string()))
    }

    fn start(root: &Path, token: Option<&str>, redirect: Option<String>) -> HttpsServer {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca = nk3_controlplane::certs::Authority::new("git-ca");
        let pair = ca.server();
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from_pem_slice(pair.cert_pem.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(pair.key_pem.as_bytes()).unwrap(),
            )
            .unwrap();
        let config = Arc::new(config);
        let port = nk3_controlplane::unused_port();
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (root, token, seen) = (
            root.to_path_buf(),
            token.map(|t| t.to_string()),
            log.clone(),
        );
        std::thread::spawn(move || {
            for tcp in listener.incoming().flatten() {
                let (config, root, token, seen, redirect) = (
                    config.clone(),
                    root.clone(),
                    token.clone(),
                    seen.clone(),
                    redirect.clone(),
                );
                std::thread::spawn(move || {
                    let Ok(conn) = rustls::ServerConnection::new(config) else {
                        return;
                    };
                    let mut tls = rustls::StreamOwned::new(conn, tcp);
                    let _ = serve_one(
                        &mut tls,
                        &root,
                        token.as_deref(),
                        redirect.as_deref(),
                        &seen,
                    );
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                });
            }
        });
        HttpsServer {
            port,
            ca_file,
            log,
            _dir: dir,
        }
    }

    /// The https:// URL of `repo`.
    pub fn url(&self, repo: &Repo) -> String {
        format!(
            "https://127.0.0.1:{}/{}",
            self.port,
            repo.bare.file_name().unwrap().to_string_lossy()
        )
    }
}

/// One request, answered by `git http-backend` as a CGI program (or redirected); the
/// connection closes. The log notes requests that carried credentials.
fn serve_one(
    tls: &mut (impl Read + Write),
    root: &Path,
    token: Option<&str>,
    redirect: Option<&str>,
    seen: &std::sync::Mutex<Vec<String>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(&mut *tls);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, target) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let header = |k: &str| headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let length: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    drop(reader);
    let with_credentials = if header("authorization").is_some() {
        " with credentials"
    } else {
        ""
    };
    let respond = |tls: &mut dyn Write, status: &str, head: &str, body: &[u8]| {
        seen.lock().unwrap().push(format!(
            "{method} {target} {}{with_credentials}",
            &status[..3]
        ));
        write!(
            tls,
            "HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n{head}\r\n",
            body.len()
        )?;
        tls.write_all(body)?;
        tls.flush()
    };
    if let Some(base) = redirect {
        return respond(
            tls,
            "302 Found",
            &format!("Location: {base}{target}\r\n"),
            b"",
        );
    }
    if let Some(token) = token {
        use base64::Engine as _;
        let ok = header("authorization")
            .and_then(|v| v.strip_prefix("Basic ").map(str::to_string))
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .and_then(|b| String::from_utf8(b).ok())
            .is_some_and(|up| up.split_once(':').is_some_and(|(_, p)| p == token));
        if !ok {
            return respond(
                tls,
                "401 Unauthorized",
                "WWW-Authenticate: Basic realm=\"git\"\r\n",
                b"",
            );
        }
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let exec_path = crate::fixtures::git(root, &["--exec-path"]);
    let mut cgi = Command::new(Path::new(&exec_path).join("git-http-backend"))
        .env_clear()
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REQUEST_METHOD", &method)
        .env("PATH_INFO", path)
        .env("QUERY_STRING", query)
        .env("CONTENT_TYPE", header("content-type").unwrap_or_default())
        .env("CONTENT_LENGTH", length.to_string())
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("GIT_HTTP_MAX_REQUEST_BUFFER", "100M")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    cgi.stdin.take().unwrap().write_all(&body)?;
    let out = cgi.wait_with_output()?;
    let split = out
        .stdout
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4))
        .or_else(|| {
            out.stdout
                .windows(2)
                .position(|w| w == b"\n\n")
                .map(|i| (i, 2))
        })
        .unwrap_or((0, 0));
    let head = String::from_utf8_lossy(&out.stdout[..split.0]).to_string();
    let mut status = "200 OK".to_string();
    let mut kept = String::new();
    for h in head.lines() {
        match h.split_once(':') {
            Some((k, v)) if k.eq_ignore_ascii_case("status") => status = v.trim().to_string(),
            Some(_) => kept.push_str(&format!("{}\r\n", h.trim_end())),
            None => {}
        }
    }
    respond(tls, &status, &kept, &out.stdout[split.0 + split.1..])
}
