//! HTTPS for the API: the `[api] certfile`/`keyfile` pair loaded into a
//! rustls server config (ring provider). Every problem is a config error
//! naming the key, found when the agent starts, not on the first request.

use crate::config::ConfigError;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

pub(crate) fn server_config(
    config_path: &Path,
    certfile: &Path,
    keyfile: &Path,
) -> Result<Arc<rustls::ServerConfig>, ConfigError> {
    let certs =
        read_certs(certfile).map_err(|m| ConfigError::key(config_path, "api.certfile", m))?;
    let key = read_key(keyfile).map_err(|m| ConfigError::key(config_path, "api.keyfile", m))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::key(config_path, "api.certfile", e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            ConfigError::key(
                config_path,
                "api.keyfile",
                format!(
                    "{} does not go with the certificate in {}: {e}",
                    keyfile.display(),
                    certfile.display()
                ),
            )
        })?;
    Ok(Arc::new(config))
}

/// The PEM certificates in `path` (at least one).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{} is not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&text).map_err(|e| {
        format!(
            "{} holds no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {e}",
            path.display()
        )
    })
}

/// An HTTP client builder for talking to members' APIs: trusts the cluster's
/// CA (`api.cafile`, else `api.certfile`) when TLS is configured. The CLI and
/// the agent (asking peers for their positions) share it.
pub fn client_builder(cfg: &crate::config::Config) -> anyhow::Result<reqwest::ClientBuilder> {
    use anyhow::{bail, Context};
    // A pooled connection is dropped before the server's idle timeout
    // closes it, so a request never goes out on one the server is closing.
    let mut builder = reqwest::Client::builder().pool_idle_timeout(super::HEADER_TIMEOUT / 2);
    let roots = cfg.api.cafile.as_ref().map(|f| ("api.cafile", f)).or(cfg
        .api
        .certfile
        .as_ref()
        .map(|f| ("api.certfile", f)));
    if let Some((key, file)) = roots {
        let text = std::fs::read(file)
            .with_context(|| format!("{key}: cannot read {}", file.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&text)
            .with_context(|| format!("{key}: {} is not a PEM bundle", file.display()))?;
        if certs.is_empty() {
            bail!("{key}: {} holds no PEM certificate", file.display());
        }
        for c in certs {
            builder = builder.add_root_certificate(c);
        }
    }
    Ok(builder)
}
