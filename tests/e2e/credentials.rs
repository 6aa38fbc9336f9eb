//! The other credentials: client certificate, workload identity and managed
//! identity, each through azure_identity against the fake token endpoints.

use std::time::Duration;

use openssl::asn1::Asn1Time;
use openssl::hash::MessageDigest;
use openssl::pkcs12::Pkcs12;
use openssl::pkey::PKey;
use openssl::rsa::Rsa;
use openssl::x509::{X509, X509NameBuilder};
use presence_reaper::App;
use presence_reaper::config::{Config, Environment};
use serde_json::json;

use crate::helpers::{APP_ID, Daemon, World, write_config};

/// A PKCS#12 bundle with a fresh RSA key and self-signed certificate.
fn pkcs12(password: &str) -> Vec<u8> {
    let key = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_text("CN", "presence-reaper test")
        .unwrap();
    let name = name.build();
    let mut cert = X509::builder().unwrap();
    cert.set_version(2).unwrap();
    cert.set_subject_name(&name).unwrap();
    cert.set_issuer_name(&name).unwrap();
    cert.set_pubkey(&key).unwrap();
    cert.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    cert.set_not_after(&Asn1Time::days_from_now(1).unwrap())
        .unwrap();
    cert.sign(&key, MessageDigest::sha256()).unwrap();
    let cert = cert.build();
    Pkcs12::builder()
        .name("test")
        .pkey(&key)
        .cert(&cert)
        .build2(password)
        .unwrap()
        .to_der()
        .unwrap()
}

/// The test config with `[auth]` rewritten to `auth`.
fn config_with_auth(w: &World, auth: &str) -> String {
    let text = w.config_toml("", "");
    let start = text.find("[auth]").unwrap();
    let end = text.find("[tls]").unwrap();
    format!("{}{auth}\n{}", &text[..start], &text[end..])
}

async fn clears_one_session(w: &World, config: Config) {
    let app = App::build(config).await.expect("app builds");
    let addr = app.local_addr().unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(app.run(cancel.clone()));
    w.fake.set_presence("a@contoso.com", APP_ID);
    let http = reqwest::Client::new();
    let r = http
        .delete(format!("http://{addr}/v1/sessions/a@contoso.com?wait=true"))
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(body["state"], "cleared", "{body}");
    cancel.cancel();
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_client_certificate_gets_tokens() {
    let w = World::new().await;
    let pfx = w.dir.path().join("app.pfx");
    std::fs::write(&pfx, pkcs12("pfx-password")).unwrap();
    let pw = w.dir.path().join("pfx-password");
    std::fs::write(&pw, "pfx-password\n").unwrap();
    let t = w.fake.tenant();
    let auth = format!(
        "[auth]\ntenant_id = \"{}\"\nclient_id = \"{}\"\ncredential = \"client_certificate\"\n\
         client_certificate_file = \"{}\"\nclient_certificate_password_file = \"{}\"\nauthority_host = \"{}\"\n",
        t.tenant_id,
        t.client_id,
        pfx.display(),
        pw.display(),
        w.fake.authority_host()
    );
    let config = Config::from_toml(&config_with_auth(&w, &auth), &Environment::default()).unwrap();
    assert!(!config.to_redacted_toml().contains("pfx-password"));
    clears_one_session(&w, config).await;
    assert!(w.fake.token_requests() >= 1);

    // A file that is no PKCS#12 bundle fails the start, naming the key.
    std::fs::write(&pfx, "not a certificate").unwrap();
    let config = Config::from_toml(&config_with_auth(&w, &auth), &Environment::default()).unwrap();
    let err = App::build(config).await.unwrap_err().to_string();
    assert!(err.contains("auth.client_certificate_file"), "{err}");
}

#[tokio::test]
async fn a_workload_identity_presents_its_service_account_token() {
    let w = World::new().await;
    let token = w.dir.path().join("sa-token");
    std::fs::write(&token, &w.fake.tenant().federated_token).unwrap();
    let t = w.fake.tenant();
    let auth = format!(
        "[auth]\ntenant_id = \"{}\"\nclient_id = \"{}\"\ncredential = \"workload_identity\"\n\
         federated_token_file = \"{}\"\nauthority_host = \"{}\"\n",
        t.tenant_id,
        t.client_id,
        token.display(),
        w.fake.authority_host()
    );
    let config = Config::from_toml(&config_with_auth(&w, &auth), &Environment::default()).unwrap();
    clears_one_session(&w, config).await;
}

#[tokio::test]
async fn missing_credential_inputs_are_configuration_errors() {
    let w = World::new().await;
    let t = w.fake.tenant();
    for (auth, key) in [
        (
            "credential = \"client_certificate\"",
            "auth.client_certificate_file",
        ),
        (
            "credential = \"client_certificate\"\nclient_certificate_file = \"/nonexistent.pfx\"",
            "auth.client_certificate_file",
        ),
        (
            "credential = \"workload_identity\"",
            "auth.federated_token_file",
        ),
        (
            "credential = \"workload_identity\"\nfederated_token_file = \"/nonexistent/token\"",
            "auth.federated_token_file",
        ),
        (
            "credential = \"managed_identity\"\nclient_secret_file = \"/x\"",
            "auth.client_secret_file",
        ),
        (
            "credential = \"client_secret\"\nuser_assigned_identity = true\nclient_secret_file = \"/x\"",
            "auth.user_assigned_identity",
        ),
        ("credential = \"password\"", "auth.credential"),
    ] {
        let text = config_with_auth(
            &w,
            &format!(
                "[auth]\ntenant_id = \"{}\"\nclient_id = \"{}\"\n{auth}\n",
                t.tenant_id, t.client_id
            ),
        );
        let err = Config::from_toml(&text, &Environment::default()).unwrap_err();
        assert_eq!(err.key, key, "{auth}: {err}");
    }
    // A managed identity needs no tenant.
    let text = config_with_auth(
        &w,
        &format!(
            "[auth]\nclient_id = \"{}\"\ncredential = \"managed_identity\"\n",
            t.client_id
        ),
    );
    assert!(Config::from_toml(&text, &Environment::default()).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_managed_identity_uses_the_identity_endpoint() {
    let w = World::new().await;
    let path = write_config(&w, "", "");
    let t = w.fake.tenant();
    let text = std::fs::read_to_string(&path).unwrap();
    let start = text.find("[auth]").unwrap();
    let end = text.find("[tls]").unwrap();
    let auth = format!(
        "[auth]\nclient_id = \"{}\"\ncredential = \"managed_identity\"\nuser_assigned_identity = true\n\n",
        t.client_id
    );
    std::fs::write(&path, format!("{}{auth}{}", &text[..start], &text[end..])).unwrap();
    let endpoint = format!("{}/msi/token", w.fake.origin());
    let d = Daemon::start_with_env(
        &path,
        &[
            ("IDENTITY_ENDPOINT", endpoint.as_str()),
            ("IDENTITY_HEADER", t.identity_header.as_str()),
        ],
    );
    w.fake.set_presence("a@contoso.com", APP_ID);
    d.put("a@contoso.com", json!({"ttl_seconds": 1})).await;
    assert!(w.fake.wait_for_answer(Duration::from_secs(5), 200).await);
    d.signal("-TERM");
    assert_eq!(d.wait_exit(Duration::from_secs(10)).0, Some(0));
    assert!(w.fake.token_requests() >= 1);
}
