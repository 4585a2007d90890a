//! A stand-in for UCloud/Core: the provider's RSA key pair (made with `openssl`), tokens
//! signed as Core signs its calls, and the control API endpoints vmhost reports to.

use std::sync::{Arc, Mutex};

use base64::Engine as _;
use serde_json::{json, Value};

/// The provider's key pair, as Core holds it.
pub struct CoreKeys {
    /// PKCS#8 PEM of the private half, which Core signs with.
    private_pem: Vec<u8>,
    /// `publicKey` as Core hands it to the provider: base64 DER SubjectPublicKeyInfo.
    pub public_key: String,
}

impl CoreKeys {
    pub fn generate(dir: &std::path::Path) -> CoreKeys {
        let key = dir.join("provider-key.pem");
        let run = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .output()
                .expect("openssl runs (scripts/install-deps.sh installs it)");
            assert!(out.status.success(), "openssl {args:?}: {out:?}");
            out.stdout
        };
        let key_path = key.to_str().unwrap();
        run(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            key_path,
        ]);
        let der = run(&["pkey", "-in", key_path, "-pubout", "-outform", "DER"]);
        CoreKeys {
            private_pem: std::fs::read(&key).unwrap(),
            public_key: base64::engine::general_purpose::STANDARD.encode(der),
        }
    }

    /// A token with these claims, signed RS256 with the provider's private key.
    pub fn sign(&self, claims: &Value) -> String {
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(&self.private_pem).unwrap();
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
            claims,
            &key,
        )
        .unwrap()
    }

    /// What Core sends on its own calls to a provider, valid for ten minutes.
    pub fn core_token(&self) -> String {
        self.sign(&core_claims(600))
    }
}

/// Core's claims for its own calls, expiring `valid_secs` from now (negative: expired).
pub fn core_claims(valid_secs: i64) -> Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    json!({
        "sub": "_UCloud", "role": "SERVICE", "principalType": "service",
        "iss": "cloud.sdu.dk", "aud": ["all:write"], "iat": now, "exp": now + valid_secs,
    })
}

/// Core's control API as far as vmhost calls it: refresh tokens are exchanged for access
/// tokens, and job updates are recorded in arrival order.
#[derive(Clone, Default)]
pub struct FakeCore {
    pub updates: Arc<Mutex<Vec<Value>>>,
}

impl FakeCore {
    /// Serves on a free port of 127.0.0.1; returns the base URL.
    pub async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        self.serve(listener)
    }

    /// Serves on 127.0.0.1:`port`.
    pub async fn start_on(&self, port: u16) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        self.serve(listener);
    }

    fn serve(&self, listener: tokio::net::TcpListener) -> String {
        use axum::routing::post;
        let updates = self.updates.clone();
        let app = axum::Router::new()
            .route(
                "/auth/providers/refresh",
                post(|| async {
                    let exp = core_claims(600)["exp"].clone();
                    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
                        .encode(json!({ "sub": "#P_vmhost", "exp": exp }).to_string());
                    axum::Json(json!({ "responses": [{
                        "accessToken": format!("eyJhbGciOiJSUzI1NiJ9.{payload}.c2ln"),
                        "csrfToken": "",
                    }] }))
                }),
            )
            .route(
                "/api/jobs/control/update",
                post(move |axum::Json(body): axum::Json<Value>| {
                    let updates = updates.clone();
                    async move {
                        let items = body["items"].as_array().cloned().unwrap_or_default();
                        updates.lock().unwrap().extend(items);
                        axum::Json(json!({}))
                    }
                }),
            );
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        url
    }

    /// Waits up to 10 s until Core was told exactly these states of job `core_id`, in order.
    pub async fn wait_states(&self, core_id: &str, states: &[&str]) -> bool {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while tokio::time::Instant::now() < deadline {
            if self.states_of(core_id) == states {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        false
    }

    /// The states Core was told of job `core_id`, in order.
    pub fn states_of(&self, core_id: &str) -> Vec<String> {
        self.updates
            .lock()
            .unwrap()
            .iter()
            .filter(|item| item["id"] == core_id)
            .filter_map(|item| item["update"]["state"].as_str().map(str::to_owned))
            .collect()
    }
}
