//! A throwaway Dovecot for the tests that speak IMAP: Debian's
//! `dovecot-imapd`, started as a non-root process with a configuration of
//! its own on a free loopback port, one account ([`USER`], [`PASS`]), and
//! stopped by its pid when dropped. Without `/usr/sbin/dovecot` the test
//! fails.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::TryStreamExt;

use super::common;
use super::support;
use support::tls::TestCa;

pub const USER: &str = "agent@example.org";
pub const PASS: &str = "imap-pass-4d1e";

/// A throwaway Dovecot, stopped (by its pid) on drop.
pub struct Dovecot {
    pub port: u16,
    /// Implicit TLS (IMAPS), when started with a certificate.
    pub tls_port: u16,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

/// The user Dovecot runs as: `nobody` when the tests run as root (Dovecot
/// then needs no privilege), else the current user.
fn run_as() -> (String, String, Option<(u32, u32)>) {
    let uid = support::euid();
    if uid == 0 {
        ("nobody".into(), "nogroup".into(), Some((65534, 65534)))
    } else {
        let out = |args: &[&str]| {
            let o = std::process::Command::new("id")
                .args(args)
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stdout).trim().to_owned()
        };
        (out(&["-un"]), out(&["-gn"]), None)
    }
}

impl Dovecot {
    pub fn start() -> Dovecot {
        Dovecot::start_with(None, None)
    }

    /// With `ca`, Dovecot offers STARTTLS on `port` and implicit TLS on
    /// `tls_port`, with the CA's certificate for localhost. With
    /// `introspect` (a port), it takes XOAUTH2 too, asking that token
    /// endpoint's `/introspect` whether a bearer token is active.
    pub fn start_with(ca: Option<&TestCa>, introspect: Option<u16>) -> Dovecot {
        let binary = PathBuf::from("/usr/sbin/dovecot");
        assert!(
            binary.exists(),
            "/usr/sbin/dovecot is missing: install Debian's dovecot-imapd"
        );
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for sub in ["run", "state", "home"] {
            std::fs::create_dir(d.join(sub)).unwrap();
        }
        let port = common::free_port();
        let tls_port = if ca.is_some() { common::free_port() } else { 0 };
        let ssl = match ca {
            Some(ca) => {
                std::fs::write(d.join("cert.pem"), &ca.cert_pem).unwrap();
                std::fs::write(d.join("key.pem"), &ca.key_pem).unwrap();
                format!(
                    "ssl = yes\nssl_cert = <{0}/cert.pem\nssl_key = <{0}/key.pem",
                    d.display()
                )
            }
            None => "ssl = no".to_owned(),
        };
        let oauth = match introspect {
            Some(p) => {
                std::fs::write(
                    d.join("oauth2.conf.ext"),
                    format!(
                        "introspection_mode = post\nintrospection_url = http://127.0.0.1:{p}/introspect\nusername_attribute = username\nactive_attribute = active\nactive_value = true\nforce_introspection = yes\n"
                    ),
                )
                .unwrap();
                format!(
                    "passdb {{\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n  args = {}/oauth2.conf.ext\n}}\n",
                    d.display()
                )
            }
            None => String::new(),
        };
        let mechanisms = if introspect.is_some() {
            "plain login xoauth2 oauthbearer"
        } else {
            "plain login"
        };
        let (user, group, ids) = run_as();
        std::fs::write(d.join("passwd"), format!("{USER}:{{PLAIN}}{PASS}\n")).unwrap();
        let conf = format!(
            r#"
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
info_log_path = {d}/dovecot.log
protocols = imap
listen = 127.0.0.1
{ssl}
disable_plaintext_auth = no
auth_mechanisms = {mechanisms}
default_internal_user = {user}
default_internal_group = {group}
default_login_user = {user}
mail_location = maildir:{d}/home/%u/Maildir
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {tls_port}
  }}
  chroot =
}}
service anvil {{
  chroot =
}}
{oauth}passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/passwd
}}
userdb {{
  driver = static
  args = uid={user} gid={group} home={d}/home/%u
}}
namespace inbox {{
  inbox = yes
  separator = /
  mailbox "Sent Messages" {{
    auto = create
    special_use = \Sent
  }}
  mailbox Drafts {{
    auto = create
    special_use = \Drafts
  }}
}}
"#,
            d = d.display()
        );
        std::fs::write(d.join("dovecot.conf"), conf).unwrap();
        let mut cmd = std::process::Command::new(binary);
        cmd.args(["-F", "-c"]).arg(d.join("dovecot.conf"));
        if let Some((uid, gid)) = ids {
            support::chown_all(d, uid, gid);
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(gid);
        }
        let child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("dovecot starts");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "dovecot never listened: {}",
                std::fs::read_to_string(d.join("dovecot.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Dovecot {
            port,
            tls_port,
            child,
            _dir: dir,
        }
    }

    /// Every message in `folder`: (flags, bytes).
    /// A plain IMAP session as the test user, straight to Dovecot.
    pub async fn login(&self) -> async_imap::Session<tokio::net::TcpStream> {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .unwrap();
        let mut client = async_imap::Client::new(tcp);
        client.read_response().await.unwrap();
        client.login(USER, PASS).await.map_err(|(e, _)| e).unwrap()
    }

    pub async fn messages(&self, folder: &str) -> Vec<(Vec<String>, Vec<u8>)> {
        let mut session = self.login().await;
        let mailbox = session.select(folder).await.unwrap();
        let mut out = Vec::new();
        if mailbox.exists > 0 {
            let fetched: Vec<_> = session
                .fetch("1:*", "(FLAGS BODY.PEEK[])")
                .await
                .unwrap()
                .try_collect()
                .await
                .unwrap();
            for f in fetched {
                let flags = f.flags().map(|fl| format!("{fl:?}")).collect();
                out.push((flags, f.body().unwrap_or_default().to_vec()));
            }
        }
        let _ = session.logout().await;
        out
    }

    /// Files `bytes` in `folder` as a client would.
    pub async fn append(&self, folder: &str, bytes: &[u8]) {
        let mut session = self.login().await;
        session.append(folder, None, None, bytes).await.unwrap();
        let _ = session.logout().await;
    }

    pub async fn count(&self, folder: &str) -> u32 {
        let mut session = self.login().await;
        let n = session.examine(folder).await.unwrap().exists;
        let _ = session.logout().await;
        n
    }
}
