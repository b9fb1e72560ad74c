//! The proxy settings hot reload may change, swapped whole.

use http::header::HeaderName;

use crate::config::{Config, ModelRules};

/// Settings that hot reload may change.
#[derive(Debug, Clone)]
pub struct LiveSettings {
    /// Header carrying the sticky A/B key.
    pub key_header: HeaderName,
    /// Header carrying the tenant.
    pub tenant_header: Option<HeaderName>,
    /// `[models."NAME"]`: what requests for a model are normalised to.
    pub models: ModelRules,
}

impl LiveSettings {
    /// From a validated config.
    pub fn from_config(c: &Config) -> LiveSettings {
        LiveSettings {
            key_header: HeaderName::from_bytes(c.ab.key_header.as_bytes())
                .unwrap_or(HeaderName::from_static("x-maitre-key")),
            tenant_header: c
                .tenant_header
                .as_ref()
                .and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok()),
            models: c.models.clone(),
        }
    }
}
