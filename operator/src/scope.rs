//! Which namespaces the operator watches: every namespace (the default, with a ClusterRole), or
//! one (with a Role there only, so that the operator can read no Secret and patch no pod
//! elsewhere).
//!
//! Invariant: every `Api` a controller watches is built by [`WatchScope::api`], so in a
//! namespace scope no request lists or watches across namespaces. Reconciliations already
//! address only their object's own namespace.
//!
//! One namespace, not a list: kube's `Controller` watches one `Api` per resource, and a list
//! would need a controller per namespace; run one operator per namespace instead.

use std::fmt;
use std::str::FromStr;

use k8s_openapi::NamespaceResourceScope;
use kube::{Api, Client, Resource};

/// The namespaces the controllers watch.
///
/// ```
/// use courier_operator::scope::WatchScope;
///
/// assert_eq!("".parse::<WatchScope>().unwrap(), WatchScope::AllNamespaces);
/// assert_eq!(
///     "team-a".parse::<WatchScope>().unwrap(),
///     WatchScope::Namespace("team-a".to_owned())
/// );
/// assert!("Team_A".parse::<WatchScope>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum WatchScope {
    /// Every namespace: `Api::all`, and the chart's ClusterRole.
    #[default]
    AllNamespaces,
    /// This namespace only: `Api::namespaced`, and a Role in it.
    Namespace(String),
}

impl WatchScope {
    /// The `Api` of `K` the controllers watch in this scope.
    pub fn api<K>(&self, client: Client) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
    {
        match self {
            WatchScope::AllNamespaces => Api::all(client),
            WatchScope::Namespace(namespace) => Api::namespaced(client, namespace),
        }
    }

    /// The name of the leader-election Lease: `courier-operator` for every namespace (as
    /// before), `courier-operator-<namespace>` for one, so that operators of different
    /// namespaces installed side by side each elect a leader of their own.
    pub fn lease_name(&self) -> String {
        match self {
            WatchScope::AllNamespaces => "courier-operator".to_owned(),
            WatchScope::Namespace(namespace) => format!("courier-operator-{namespace}"),
        }
    }
}

impl fmt::Display for WatchScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WatchScope::AllNamespaces => f.write_str("all namespaces"),
            WatchScope::Namespace(namespace) => write!(f, "namespace {namespace}"),
        }
    }
}

/// A watch namespace that is not a namespace's name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "watch namespace {given:?} is not a namespace name ({problem}); give one namespace, \
     or nothing to watch every namespace"
)]
pub struct InvalidWatchNamespace {
    /// What was given.
    pub given: String,
    /// What is wrong with it.
    pub problem: &'static str,
}

impl FromStr for WatchScope {
    type Err = InvalidWatchNamespace;

    /// Empty (or blank) means every namespace; anything else must be a namespace's name (an
    /// RFC 1123 label: at most 63 lower-case letters, digits and `-`, starting and ending
    /// with a letter or digit).
    fn from_str(given: &str) -> Result<Self, Self::Err> {
        let name = given.trim();
        let invalid = |problem| InvalidWatchNamespace {
            given: given.to_owned(),
            problem,
        };
        if name.is_empty() {
            return Ok(WatchScope::AllNamespaces);
        }
        if name.contains(',') {
            return Err(invalid(
                "one namespace only; run one operator per namespace",
            ));
        }
        if name.len() > 63 {
            return Err(invalid("longer than 63 characters"));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(invalid("only lower-case letters, digits and '-'"));
        }
        if name.starts_with('-') || name.ends_with('-') {
            return Err(invalid("must start and end with a letter or digit"));
        }
        Ok(WatchScope::Namespace(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_means_every_namespace() {
        assert_eq!("".parse(), Ok(WatchScope::AllNamespaces));
        assert_eq!("  ".parse(), Ok(WatchScope::AllNamespaces));
    }

    #[test]
    fn a_namespace_name_scopes_the_watch_to_it() {
        assert_eq!(
            " team-a ".parse(),
            Ok(WatchScope::Namespace("team-a".to_owned()))
        );
        assert_eq!("a".parse(), Ok(WatchScope::Namespace("a".to_owned())));
    }

    #[test]
    fn operators_of_different_namespaces_elect_leaders_apart() {
        assert_eq!(WatchScope::AllNamespaces.lease_name(), "courier-operator");
        let a = WatchScope::Namespace("team-a".to_owned()).lease_name();
        let b = WatchScope::Namespace("team-b".to_owned()).lease_name();
        assert_eq!(a, "courier-operator-team-a");
        assert_ne!(a, b);
    }

    #[test]
    fn what_is_not_one_namespace_name_is_refused_with_the_reason() {
        for (given, problem) in [
            ("team-a,team-b", "one namespace only"),
            ("Team-A", "lower-case"),
            ("team_a", "lower-case"),
            ("-team", "start and end"),
            ("team-", "start and end"),
        ] {
            let error = given.parse::<WatchScope>().unwrap_err();
            assert!(error.problem.contains(problem), "{given}: {error}");
            assert!(error.to_string().contains(given), "{error}");
        }
        assert!("a".repeat(64).parse::<WatchScope>().is_err());
        assert!("a".repeat(63).parse::<WatchScope>().is_ok());
    }
}
