//! Address rules: `allowed_senders` and `allowed_recipients` entries, parsed
//! once at load and matched against parsed addresses (never display names).
//!
//! Domains are compared in their ASCII (IDNA) form, lowercased, so
//! `bücher.example` and `xn--bcher-kva.example` are one domain and a
//! look-alike in another script is another. Local parts are compared
//! exactly (RFC 5321 makes them case-sensitive).
//!
//! A local part that holds `%` or `!` never matches a domain rule: mail
//! servers such as Postfix (`allow_percent_hack`, `swap_bangpath`, both on
//! by default) deliver `drop%attacker.net@example.org` and
//! `attacker.net!drop@example.org` to `drop@attacker.net` when example.org
//! is their own domain, so `@example.org` would admit any address. Only an
//! exact entry admits such an address.

use lettre::Address;

/// One `allowed_recipients` (or `allowed_senders`) entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressRule {
    /// `*`: everyone.
    Any,
    /// `local@domain`.
    Exact { local: String, domain: String },
    /// `@domain`: that domain exactly, any local part.
    Domain(String),
    /// `@*.domain`: any subdomain of it (not the domain itself).
    Subdomains(String),
}

/// The ASCII form of a domain, lowercased; `None` when IDNA refuses it.
pub fn ascii_domain(domain: &str) -> Option<String> {
    let domain = domain.trim_end_matches('.');
    if domain.is_ascii() {
        return Some(domain.to_ascii_lowercase());
    }
    idna::domain_to_ascii(domain)
        .ok()
        .map(|d| d.to_ascii_lowercase())
}

impl AddressRule {
    /// Parses an entry as the configuration writes it. `subdomains` allows
    /// `@*.domain` and `*` (recipients only).
    pub fn parse(entry: &str, subdomains: bool) -> Result<AddressRule, String> {
        let entry = entry.trim();
        if entry == "*" && subdomains {
            return Ok(AddressRule::Any);
        }
        let Some((local, domain)) = entry.rsplit_once('@') else {
            return Err(format!(
                "{entry:?} is not an address or `@domain`{}",
                if subdomains {
                    ", `@*.domain` or `*`"
                } else {
                    ""
                }
            ));
        };
        let (wild, domain) = match domain.strip_prefix("*.") {
            Some(rest) if subdomains && local.is_empty() => (true, rest),
            _ => (false, domain),
        };
        if domain.is_empty() || domain.contains(['*', ' ', '@', '<', '>']) {
            return Err(format!("{entry:?} has no valid domain"));
        }
        let ascii = ascii_domain(domain)
            .ok_or_else(|| format!("{entry:?}: the domain is not a valid (IDNA) domain"))?;
        Ok(if wild {
            AddressRule::Subdomains(ascii)
        } else if local.is_empty() {
            AddressRule::Domain(ascii)
        } else {
            if local.contains(['*', ' ', '<', '>']) {
                return Err(format!("{entry:?} has an invalid local part"));
            }
            AddressRule::Exact {
                local: local.to_owned(),
                domain: ascii,
            }
        })
    }

    /// Whether the address matches, given its domain in ASCII form.
    fn matches(&self, local: &str, ascii: &str) -> bool {
        match self {
            AddressRule::Any => true,
            AddressRule::Exact { local: l, domain } => l == local && domain == ascii,
            AddressRule::Domain(domain) => domain == ascii && !routes_on(local),
            AddressRule::Subdomains(domain) => {
                !routes_on(local)
                    && ascii
                        .strip_suffix(domain.as_str())
                        .is_some_and(|head| head.len() > 1 && head.ends_with('.'))
            }
        }
    }
}

/// Whether a local part holds a route to another domain (`user%domain`,
/// `domain!user`), which some mail servers follow.
pub fn routes_on(local: &str) -> bool {
    local.contains(['%', '!'])
}

/// Whether `address` matches any of `rules`. An address whose domain IDNA
/// refuses matches nothing.
pub fn allowed(rules: &[AddressRule], address: &Address) -> bool {
    let Some(ascii) = ascii_domain(address.domain()) else {
        return false;
    };
    rules.iter().any(|r| r.matches(address.user(), &ascii))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Address {
        s.parse().expect("valid address")
    }

    fn rules(list: &[&str]) -> Vec<AddressRule> {
        list.iter()
            .map(|e| AddressRule::parse(e, true).expect("valid rule"))
            .collect()
    }

    #[test]
    fn domains_compare_case_insensitively_and_exactly() {
        let r = rules(&["@example.org"]);
        assert!(allowed(&r, &addr("a@example.org")));
        assert!(allowed(&r, &addr("a@EXAMPLE.Org")));
        assert!(!allowed(&r, &addr("a@sub.example.org")));
        assert!(!allowed(&r, &addr("a@notexample.org")));
        assert!(!allowed(&r, &addr("a@example.org.attacker.net")));
        assert!(!allowed(&r, &addr("a@evil.example.org.attacker.net")));
    }

    #[test]
    fn subdomains_match_below_the_domain_only() {
        let r = rules(&["@*.example.org"]);
        assert!(allowed(&r, &addr("a@mail.example.org")));
        assert!(allowed(&r, &addr("a@x.y.example.org")));
        assert!(!allowed(&r, &addr("a@example.org")));
        assert!(!allowed(&r, &addr("a@badexample.org")));
        assert!(!allowed(&r, &addr("a@example.org.attacker.net")));
    }

    #[test]
    fn a_local_part_that_routes_elsewhere_matches_no_domain_rule() {
        let r = rules(&["@example.org", "@*.example.org"]);
        for routed in [
            "drop%attacker.net@example.org",
            "attacker.net!drop@example.org",
            "drop%attacker.net@mail.example.org",
            "a!b%c@example.org",
        ] {
            assert!(!allowed(&r, &addr(routed)), "{routed}");
        }
        assert!(allowed(&r, &addr("first.last+tag@example.org")));
        // Written out exactly, an operator admits it.
        let exact = rules(&["team%sales@example.org"]);
        assert!(allowed(&exact, &addr("team%sales@example.org")));
        assert!(allowed(
            &rules(&["*"]),
            &addr("drop%attacker.net@example.org")
        ));
    }

    #[test]
    fn exact_addresses_keep_the_local_part_exact() {
        let r = rules(&["ops@Example.org"]);
        assert!(allowed(&r, &addr("ops@example.ORG")));
        assert!(!allowed(&r, &addr("Ops@example.org")));
        assert!(!allowed(&r, &addr("ops2@example.org")));
    }

    #[test]
    fn idna_forms_are_one_domain_and_lookalikes_are_not() {
        let r = rules(&["@bücher.example"]);
        assert!(allowed(&r, &addr("a@xn--bcher-kva.example")));
        assert!(allowed(&r, &addr("a@BÜCHER.example")));
        let r = rules(&["@example.org"]);
        // A Cyrillic "а" in place of the Latin one.
        assert!(!allowed(&r, &addr("a@ex\u{430}mple.org")));
    }

    #[test]
    fn star_allows_everyone_and_bad_rules_are_refused() {
        assert!(allowed(&rules(&["*"]), &addr("a@anything.net")));
        assert!(AddressRule::parse("example.org", true).is_err());
        assert!(AddressRule::parse("@", true).is_err());
        assert!(AddressRule::parse("a@*.example.org", true).is_err());
        assert!(AddressRule::parse("*", false).is_err());
    }
}
