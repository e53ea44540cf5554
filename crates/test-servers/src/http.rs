//! A bare HTTP/1.1 GET, for tests that read a stage's /metrics, /healthz or /readyz.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// GETs `path` from `addr`; returns the status code and the body, or None when the server does
/// not answer (not listening yet, or gone).
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let response = String::from_utf8_lossy(&response);
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let (_, body) = response.split_once("\r\n\r\n")?;
    Some((status, body.to_owned()))
}

/// A free address on 127.0.0.1 for a stage's HTTP server, never handed out twice by this
/// process.
pub fn free_addr() -> SocketAddr {
    let port = crate::process::free_port().expect("a free loopback port");
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The value of a counter or gauge in a Prometheus text page, summed over its label sets; 0 when
/// the page has none.
pub fn metric_value(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with([' ', '{']))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
