//! `imageindex controller`: its flags, and starting the operator from them.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};

use super::{ControllerConfig, Settings};
use crate::contract::env;

#[derive(clap::Args)]
pub struct ControllerArgs {
    /// Image for embedding Jobs and search pods when an ImageIndex names none.
    #[arg(long, env = env::IMAGE, default_value = concat!("ghcr.io/imageindex/imageindex:", env!("CARGO_PKG_VERSION")))]
    image: String,
    /// Watch only this namespace (default: all).
    #[arg(long, env = env::WATCH_NAMESPACE)]
    namespace: Option<String>,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = env::METRICS_LISTEN, default_value = "127.0.0.1:8081")]
    metrics_listen: SocketAddr,
    /// Namespace of the leader-election Lease (in a pod: its own namespace).
    #[arg(long, env = env::POD_NAMESPACE, default_value = "default")]
    lease_namespace: String,
    #[arg(long, env = env::LEASE_NAME, default_value = "imageindex-controller")]
    lease_name: String,
    /// Run without leader election (only ever one replica).
    #[arg(long)]
    no_leader_election: bool,
    /// This replica's name in the Lease (in a pod: its name).
    #[arg(long, env = env::POD_NAME)]
    identity: Option<String>,
    /// Seconds a plan Job may run: making or checking the collection, listing the bucket and
    /// diffing it against the catalog.
    #[arg(long, env = env::PLAN_TIMEOUT, default_value_t = 3600)]
    plan_timeout: u64,
    /// Seconds a cleanup on deletion keeps retrying (its Job failing, Milvus or MySQL down);
    /// then the data is kept, with a Warning, and the ImageIndex goes.
    #[arg(long, env = env::CLEANUP_TIMEOUT, default_value_t = 600)]
    cleanup_timeout: u64,
    /// Images an ImageIndex may name for its pods, comma-separated: exact, or a prefix ending in
    /// `*`. Empty: any image. The operator's own image is always allowed.
    #[arg(long, env = env::ALLOWED_IMAGES, value_delimiter = ',', num_args = 0..)]
    allowed_images: Vec<String>,
    /// ServiceAccounts an ImageIndex may name for its pods, comma-separated. Empty: any.
    #[arg(long, env = env::ALLOWED_SERVICE_ACCOUNTS, value_delimiter = ',', num_args = 0..)]
    allowed_service_accounts: Vec<String>,
}

/// A comma-separated flag's entries, trimmed; empty ones (the chart's default `""`) are none.
fn listed(values: &[String]) -> Vec<String> {
    values.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()
}

/// The namespace to watch: none, or an empty one (the chart's default `""`), is every namespace.
fn watch_namespace(arg: Option<String>) -> Option<String> {
    arg.map(|n| n.trim().to_string()).filter(|n| !n.is_empty())
}

impl ControllerArgs {
    pub async fn run(self) -> Result<()> {
        let client =
            kube::Client::try_default().await.context("connecting to Kubernetes (in-cluster or kubeconfig)")?;
        let features = super::server_features(&client).await;
        // The pod's name where POD_NAME is not set: the hostname a pod gets is its name.
        let identity = self.identity.unwrap_or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| format!("imageindex-{}", std::process::id()))
        });
        let config = ControllerConfig {
            settings: Settings {
                default_image: self.image,
                features,
                plan_timeout: Duration::from_secs(self.plan_timeout),
                cleanup_timeout: Duration::from_secs(self.cleanup_timeout),
                policy: super::reconcile::validate::Policy {
                    images: listed(&self.allowed_images),
                    service_accounts: listed(&self.allowed_service_accounts),
                },
            },
            namespace: watch_namespace(self.namespace),
            listen: self.metrics_listen,
            lease: (!self.no_leader_election).then_some((self.lease_namespace, self.lease_name)),
            identity,
        };
        super::run(client, config).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_namespace_watches_all() {
        assert_eq!(watch_namespace(Some(String::new())), None);
        assert_eq!(watch_namespace(None), None);
        assert_eq!(watch_namespace(Some("shop".into())), Some("shop".into()));
    }
}
