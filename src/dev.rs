//! `presence-reaper dev`: the daemon against the built-in fake Graph and
//! token endpoint, with a temporary store. No tenant needed.

use std::path::Path;

use tokio_util::sync::CancellationToken;

use crate::app::{App, AppError};
use crate::config::{Config, ConfigError, Environment};
use crate::fake::{FakeError, FakeGraph, FakeTenant};

/// Errors starting dev mode.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// The config did not load.
    #[error("configuration error: {0}")]
    Config(#[from] ConfigError),
    /// The fake did not start.
    #[error("cannot start the fake Graph: {0}")]
    Fake(#[from] FakeError),
    /// Temporary files could not be written.
    #[error("cannot prepare the temporary directory: {0}")]
    Io(#[from] std::io::Error),
    /// The daemon failed.
    #[error(transparent)]
    App(#[from] AppError),
}

/// The placeholder secret dev mode gives the fake and the daemon.
const DEV_SECRET: &str = "dev-secret-not-a-real-one";

/// Loads `path` (if any) for dev mode: the tenant, client id and secret fall
/// back to placeholders, since the fake accepts whatever it is told to.
pub fn load_config(path: Option<&Path>, env: &Environment) -> Result<Config, ConfigError> {
    let mut env = env.clone();
    env.set_default("AZURE_TENANT_ID", "00000000-0000-4000-8000-000000000001");
    env.set_default("AZURE_CLIENT_ID", "22553876-f5ab-4529-bffb-cfe50aa89f87");
    env.set_default("AZURE_CLIENT_SECRET", DEV_SECRET);
    Config::load(path, &env)
}

/// Runs the daemon against a fresh fake until `shutdown` fires.
///
/// `cli_prefix` is how the user invokes the CLI with the same config (for
/// the commands it prints), e.g. `presence-reaper --config config.toml`.
pub async fn run(
    mut config: Config,
    cli_prefix: &str,
    shutdown: CancellationToken,
) -> Result<(), DevError> {
    let dir = tempfile::Builder::new()
        .prefix("presence-reaper-dev-")
        .tempdir()?;
    let secret = crate::config::Secret::new(DEV_SECRET);
    let tenant_id = config
        .auth
        .tenant_id
        .clone()
        .unwrap_or_else(|| FakeTenant::default().tenant_id);
    let fake = FakeGraph::start_dev(FakeTenant {
        tenant_id: tenant_id.clone(),
        client_id: config.auth.client_id.clone(),
        client_secret: secret.expose().to_owned(),
        scope: config.graph.scope.clone(),
        ..FakeTenant::default()
    })
    .await?;
    let ca = dir.path().join("fake-graph-ca.pem");
    std::fs::write(&ca, fake.ca_pem())?;
    config.graph.base_url = fake.graph_base().parse().expect("the fake's URL parses");
    config.auth.authority_host = fake
        .authority_host()
        .parse()
        .expect("the fake's URL parses");
    // The fake speaks client credentials with a secret, whatever the config uses.
    config.auth.credential = crate::config::CredentialKind::ClientSecret;
    config.auth.tenant_id = Some(tenant_id);
    config.auth.client_certificate_file = None;
    config.auth.federated_token_file = None;
    config.auth.client_secret = Some(secret);
    config.auth.client_secret_file = None;
    config.tls.extra_ca_file = Some(ca);
    config.store.path = dir.path().join("sessions.db");

    let app = App::build(config).await?;
    let cli = cli_prefix;
    println!(
        "presence-reaper dev: the daemon runs against a fake Graph at {graph}\n\
         store: {store} (deleted on exit)\n\
         API:   {endpoint}\n\n\
         Try it from another terminal (every clearPresence the fake receives is logged here):\n\n  \
         {cli} track adele@contoso.com --ttl 10s --owner demo\n  \
         {cli} list\n  \
         sleep 11; {cli} list --state cleared\n\n\
         Stop with Ctrl-C (live sessions are cleared first).",
        graph = fake.graph_base(),
        store = dir.path().join("sessions.db").display(),
        endpoint = app.endpoint(),
    );
    app.run(shutdown).await?;
    drop(fake);
    Ok(())
}
