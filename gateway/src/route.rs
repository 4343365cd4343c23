//! Routing: which readings go to the cloud, with what priority, under which upstream topic.
//!
//! Routes are tried in the order they appear in the configuration; the first whose filter matches
//! the local topic decides. No match falls back to `default_route` (cloud, normal priority, the
//! default topic template). The store keeps the *local* topic; the upstream topic is rendered when
//! the record is sent, so a backlog collected before an upstream was configured is published under
//! the prefix of the upstream it finally goes to.

use outpost_config::{
    Config, PayloadFormat, Priority as ConfigPriority, RouteTarget, StoreMode, TopicFilter,
    TopicTemplate,
};
use outpost_protocols::payload::ContentFormat;
use outpost_storage::Priority;

/// The decision for one local topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Deliver locally only; nothing is stored.
    Local,
    /// Store and forward with this priority; `format` is what the payload must decode as (if the
    /// route declared one) and `store` whether the original bytes or the normalised SenML
    /// records are stored.
    Cloud {
        priority: Priority,
        format: Option<ContentFormat>,
        store: StoreMode,
    },
}

/// The codec's name for a configured payload format.
pub fn content_format(f: PayloadFormat) -> ContentFormat {
    match f {
        PayloadFormat::Text => ContentFormat::TextPlain,
        PayloadFormat::Json => ContentFormat::Json,
        PayloadFormat::Cbor => ContentFormat::Cbor,
        PayloadFormat::SenmlJson => ContentFormat::SenmlJson,
        PayloadFormat::SenmlCbor => ContentFormat::SenmlCbor,
    }
}

#[derive(Debug, Clone)]
struct CompiledRoute {
    filter: TopicFilter,
    target: RouteTarget,
    priority: Priority,
    template: TopicTemplate,
    format: Option<ContentFormat>,
    store: StoreMode,
}

/// The routing table built from the configuration.
#[derive(Debug, Clone)]
pub struct Router {
    routes: Vec<CompiledRoute>,
    default_target: RouteTarget,
    /// `None` only if the built-in default template failed to validate, which a unit test rules
    /// out; records are then published on their local topic under the prefix.
    default_template: Option<TopicTemplate>,
}

/// The upstream topic when no route gives a template.
pub const DEFAULT_TEMPLATE: &str = "{prefix}/{node}/{topic}";

pub fn storage_priority(p: ConfigPriority) -> Priority {
    match p {
        ConfigPriority::High => Priority::High,
        ConfigPriority::Normal => Priority::Normal,
        ConfigPriority::Low => Priority::Low,
    }
}

impl Router {
    pub fn new(config: &Config) -> Self {
        let routes = config
            .routes
            .iter()
            .map(|r| CompiledRoute {
                filter: r.filter.clone(),
                target: r.target,
                priority: storage_priority(r.priority),
                template: r.upstream_topic.clone(),
                format: r.format.map(content_format),
                store: r.store,
            })
            .collect();
        Self {
            routes,
            default_target: config.default_route,
            default_template: TopicTemplate::new(DEFAULT_TEMPLATE).ok(),
        }
    }

    fn matching(&self, local_topic: &str) -> Option<&CompiledRoute> {
        self.routes.iter().find(|r| r.filter.matches(local_topic))
    }

    /// What to do with a reading published on `local_topic`.
    pub fn decide(&self, local_topic: &str) -> Decision {
        match self.matching(local_topic) {
            Some(route) => match route.target {
                RouteTarget::Local => Decision::Local,
                RouteTarget::Cloud => Decision::Cloud {
                    priority: route.priority,
                    format: route.format,
                    store: route.store,
                },
            },
            None => match self.default_target {
                RouteTarget::Local => Decision::Local,
                RouteTarget::Cloud => Decision::Cloud {
                    priority: Priority::Normal,
                    format: None,
                    store: StoreMode::Original,
                },
            },
        }
    }

    /// The upstream topic for a stored record, rendered at send time.
    pub fn upstream_topic(&self, prefix: &str, node: &str, local_topic: &str) -> String {
        match self
            .matching(local_topic)
            .map(|r| &r.template)
            .or(self.default_template.as_ref())
        {
            Some(template) => template.render(prefix, node, local_topic),
            None => format!("{prefix}/{node}/{local_topic}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_config::{Overrides, ProcessEnv};

    fn router(toml: &str) -> Router {
        let config = Config::load(Some(toml), &Overrides::default(), &ProcessEnv)
            .unwrap_or_else(|e| panic!("test config invalid: {e}"));
        Router::new(&config)
    }

    #[test]
    fn default_template_is_valid() {
        assert!(TopicTemplate::new(DEFAULT_TEMPLATE).is_ok());
    }

    #[test]
    fn first_matching_route_decides() {
        let r = router(
            r#"
default_route = "local"
[[route]]
filter = "alerts/#"
priority = "high"
upstream_topic = "plant/{node}/a/{topic}"
[[route]]
filter = "alerts/debug/#"
target = "local"
[[route]]
filter = "+/temp"
priority = "low"
"#,
        );
        let cloud = |priority| Decision::Cloud {
            priority,
            format: None,
            store: StoreMode::Original,
        };
        assert_eq!(r.decide("alerts/debug/x"), cloud(Priority::High));
        assert_eq!(r.decide("room1/temp"), cloud(Priority::Low));
        assert_eq!(r.decide("other"), Decision::Local);
        assert_eq!(
            r.upstream_topic("outpost", "gw", "alerts/fire"),
            "plant/gw/a/alerts/fire"
        );
        assert_eq!(
            r.upstream_topic("outpost", "gw", "room1/temp"),
            "outpost/gw/room1/temp"
        );
    }
}
