//! git's smart HTTP protocol over reqwest and rustls: the ref listing is a GET of
//! `info/refs?service=git-upload-pack`, each round of the fetch a POST to `git-upload-pack`.
//!
//! TLS is rustls, trusting the system's roots (or `SSL_CERT_FILE`): the same TLS stack the
//! k3s client uses, so no OpenSSL is loaded into the agent.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use git2::transport::{Service, SmartSubtransport, SmartSubtransportStream};
use reqwest::blocking::{Client, RequestBuilder, Response};
use reqwest::StatusCode;

use super::transport::{other, Settings};
use nk3_common::inventory::Secret;

const LS_SUFFIX: &str = "/info/refs?service=git-upload-pack";

/// The HTTP(S) subtransport of one connection to the remote.
pub struct Http {
    client: Client,
    settings: Settings,
    shared: Arc<Mutex<Shared>>,
}

/// What one request teaches the next.
#[derive(Debug, Default)]
struct Shared {
    /// The repository's URL after the listing's redirects.
    base: Option<String>,
    /// The server asked for credentials: send them from now on.
    authenticate: bool,
}

impl Http {
    pub fn new(settings: Settings) -> Result<Http, git2::Error> {
        let client = Client::builder()
            .use_rustls_tls()
            .connect_timeout(settings.timeout)
            // Bounds the wait for the answer's head, and then each read of its body.
            .timeout(settings.timeout)
            .user_agent(concat!(
                "git/2.0 (nk3-agent ",
                env!("CARGO_PKG_VERSION"),
                ")"
            ))
            .redirect(reqwest::redirect::Policy::custom(|attempt| {
                if attempt.previous().len() >= 5 {
                    attempt.error("more than 5 redirects")
                } else if attempt.url().scheme() != "https"
                    && attempt.previous().iter().any(|u| u.scheme() == "https")
                {
                    attempt.error("refusing a redirect from https to plain http")
                } else {
                    attempt.follow()
                }
            }))
            .build()
            .map_err(|e| git2::Error::from_str(&format!("cannot set up https: {e}")))?;
        Ok(Http {
            client,
            settings,
            shared: Arc::new(Mutex::new(Shared::default())),
        })
    }
}

impl SmartSubtransport for Http {
    fn action(
        &self,
        url: &str,
        action: Service,
    ) -> Result<Box<dyn SmartSubtransportStream>, git2::Error> {
        let conn = Conn {
            client: self.client.clone(),
            settings: self.settings.clone(),
            shared: self.shared.clone(),
            url: url.trim_end_matches('/').to_string(),
        };
        match action {
            Service::UploadPackLs => {
                let response = conn.listing().map_err(|e| git2::Error::from_str(&e))?;
                Ok(Box::new(Reply(Some(response))))
            }
            Service::UploadPack => Ok(Box::new(Post {
                conn,
                body: Vec::new(),
                response: None,
            })),
            Service::ReceivePackLs | Service::ReceivePack => {
                Err(git2::Error::from_str("nk3 only fetches; it never pushes"))
            }
        }
    }

    fn close(&self) -> Result<(), git2::Error> {
        Ok(())
    }
}

struct Conn {
    client: Client,
    settings: Settings,
    shared: Arc<Mutex<Shared>>,
    url: String,
}

impl Conn {
    fn shared(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The URL without its user, and the user the credential is for.
    fn split_user(url: &str) -> Result<(reqwest::Url, String), String> {
        let mut u = reqwest::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
        let user = percent_encoding::percent_decode_str(u.username())
            .decode_utf8_lossy()
            .into_owned();
        let _ = u.set_username("");
        let _ = u.set_password(None);
        Ok((u, if user.is_empty() { "git".into() } else { user }))
    }

    /// Sends `build(url)`, once more with the credential when the server asks for one. The
    /// credential goes only to the configured URL's scheme, host and port: not to where a
    /// redirect of the listing pointed.
    fn send(
        &self,
        url: &str,
        build: impl Fn(reqwest::Url) -> RequestBuilder,
    ) -> Result<Response, String> {
        let (bare, _) = Self::split_user(url)?;
        let (home, user) = Self::split_user(&self.url)?;
        let elsewhere = |url: &reqwest::Url| {
            format!(
                "the repository was redirected to {}, which asks for credentials; nk3 sends its credentials only to {}",
                url.origin().ascii_serialization(),
                home.origin().ascii_serialization()
            )
        };
        let credential = || {
            if bare.origin() != home.origin() {
                return Err(elsewhere(&bare));
            }
            self.credential()
        };
        let with_auth =
            |secret: &Secret| build(bare.clone()).basic_auth(&user, Some(secret.expose()));
        let authenticate = self.shared().authenticate;
        let first = if authenticate {
            with_auth(&credential()?)
        } else {
            build(bare.clone())
        };
        let response = first.send().map_err(|e| self.failed(&e))?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        // Asked by where a redirect led (reqwest sends no credentials across origins).
        if response.url().origin() != home.origin() {
            return Err(elsewhere(response.url()));
        }
        if authenticate {
            return Err("the server refused the credentials".into());
        }
        if bare.scheme() != "https" {
            return Err(
                "the server asks for credentials over plain http; nk3 sends them only over https"
                    .into(),
            );
        }
        let secret = credential()?;
        self.shared().authenticate = true;
        let again = with_auth(&secret).send().map_err(|e| self.failed(&e))?;
        if again.status() == StatusCode::UNAUTHORIZED {
            return Err("the server refused the credentials".into());
        }
        Ok(again)
    }

    /// The password or token for the server: the token file's, or the URL's.
    fn credential(&self) -> Result<Secret, String> {
        let access = &self.settings.access;
        if let Some(file) = &access.token_file {
            let token = crate::commands::read_bounded(file, 64 * 1024)
                .map_err(|e| format!("cannot read token file {}: {e}", file.display()))?;
            return Ok(Secret::new(token.trim()));
        }
        access.url_password.clone().ok_or_else(|| {
            "the server asks for credentials and none are configured (--repo-token-file)".into()
        })
    }

    fn failed(&self, e: &reqwest::Error) -> String {
        // The innermost cause: reqwest's own message repeats the URL, which the caller names.
        let why = crate::kube::innermost(e);
        let what = if e.is_timeout() {
            "no answer in time".to_string()
        } else if e.is_connect() {
            "cannot connect".to_string()
        } else if e.is_redirect() {
            "bad redirect".to_string()
        } else {
            "request failed".to_string()
        };
        format!("{what}: {why}")
    }

    fn check(&self, response: Response, want_type: &str) -> Result<Response, String> {
        let status = response.status();
        if !status.is_success() {
            return Err(format!("the server answered HTTP {status}"));
        }
        let kind = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if kind != want_type {
            return Err(format!(
                "not a git server speaking the smart HTTP protocol (it answered {})",
                if kind.is_empty() {
                    "no content type"
                } else {
                    kind
                }
            ));
        }
        Ok(response)
    }

    fn listing(&self) -> Result<Response, String> {
        let url = format!("{}{LS_SUFFIX}", self.url);
        let response = self.send(&url, |u| self.client.get(u))?;
        // Later requests go where the listing was redirected.
        if let Some(base) = response.url().as_str().strip_suffix(LS_SUFFIX) {
            let home = Self::split_user(&self.url)?.0;
            if base != home.as_str().trim_end_matches('/') {
                self.shared().base = Some(base.to_string());
            }
        }
        self.check(response, "application/x-git-upload-pack-advertisement")
    }

    fn upload_pack(&self, body: Vec<u8>) -> Result<Response, String> {
        let base = self.shared().base.clone();
        let url = format!("{}/git-upload-pack", base.as_deref().unwrap_or(&self.url));
        let response = self.send(&url, |u| {
            self.client
                .post(u)
                .header(
                    reqwest::header::CONTENT_TYPE,
                    "application/x-git-upload-pack-request",
                )
                .header(
                    reqwest::header::ACCEPT,
                    "application/x-git-upload-pack-result",
                )
                .body(body.clone())
        })?;
        self.check(response, "application/x-git-upload-pack-result")
    }
}

/// An answer's body as the stream git reads.
struct Reply(Option<Response>);

impl Read for Reply {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match &mut self.0 {
            Some(r) => r.read(buf),
            None => Ok(0),
        }
    }
}

impl Write for Reply {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(other("git wrote to the ref listing".into()))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One round of the fetch: git writes the request, then reads the answer.
struct Post {
    conn: Conn,
    body: Vec<u8>,
    response: Option<Response>,
}

impl Read for Post {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.response.is_none() {
            let body = std::mem::take(&mut self.body);
            self.response = Some(self.conn.upload_pack(body).map_err(other)?);
        }
        match &mut self.response {
            Some(r) => r.read(buf),
            None => Ok(0),
        }
    }
}

impl Write for Post {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.response.is_some() {
            return Err(other("git wrote after reading the answer".into()));
        }
        self.body.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
