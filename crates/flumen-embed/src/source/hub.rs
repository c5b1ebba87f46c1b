//! Fetching a model's files from a Hugging Face Hub repository, large files checked
//! against the sha256 the Hub publishes.

use std::path::Path;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::{chain, hex, write_file, Token, OPTIONAL_FILES, REQUIRED_FILES};

/// Downloads the required and optional files of `repo` at `revision` into `staging`.
pub(super) async fn fetch_hub(
    client: &reqwest::Client,
    endpoint: &str,
    repo: &str,
    revision: &str,
    token: Option<&Token>,
    staging: &Path,
) -> Result<(), String> {
    // Metadata without following redirects: large (LFS) files answer 302 to a CDN, and
    // the sha256 of their content is in `X-Linked-Etag` on that first answer.
    let head = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(staging);
    let endpoint = endpoint.trim_end_matches('/');
    for (file, required) in REQUIRED_FILES
        .iter()
        .map(|f| (f, true))
        .chain(OPTIONAL_FILES.iter().map(|f| (f, false)))
    {
        let url = format!("{endpoint}/{repo}/resolve/{revision}/{file}");
        let auth = |r: reqwest::RequestBuilder| match token {
            Some(Token(t)) => r.bearer_auth(t),
            None => r,
        };
        let meta = auth(head.head(&url))
            .send()
            .await
            .map_err(|e| format!("{url}: {}", chain(&e)))?;
        if meta.status() == reqwest::StatusCode::NOT_FOUND && !required {
            continue;
        }
        if !(meta.status().is_success() || meta.status().is_redirection()) {
            return Err(format!("{url}: HTTP {}", meta.status()));
        }
        let etag = ["x-linked-etag", "etag"]
            .iter()
            .find_map(|h| meta.headers().get(*h))
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.trim_start_matches("W/")
                    .trim_matches('"')
                    .to_ascii_lowercase()
            });
        let resp = auth(client.get(&url))
            .send()
            .await
            .map_err(|e| format!("{url}: {}", chain(&e)))?;
        if !resp.status().is_success() {
            return Err(format!("{url}: HTTP {}", resp.status()));
        }
        let body = resp
            .bytes()
            .await
            .map_err(|e| format!("{url}: {}", chain(&e)))?;
        // An LFS etag is the content's sha256; a git etag (40 hex) is a blob hash we
        // do not check (small text files, parsed and validated when loaded).
        if let Some(want) =
            etag.filter(|e| e.len() == 64 && e.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            let got = hex(&Sha256::digest(&body));
            if got != want {
                return Err(format!(
                    "{file}: sha256 {got} differs from the Hub's {want}"
                ));
            }
        }
        write_file(staging, file, &body)?;
    }
    Ok(())
}
