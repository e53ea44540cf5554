//! A throwaway Mosquitto broker (MQTT 3.1.1 and 5) on a free loopback port.
//!
//! Configured as the local stack's (scripts/stack.sh): queues are bounded only by memory
//! (`max_queued_messages 100000000`, `max_queued_bytes 0`) so a persistent session keeps every
//! QoS 1 message, and packets over 900 KiB are refused at the door (`max_packet_size 921600`), so
//! tests see what the code under test does, not a broker dropping messages. `set_tcp_nodelay`
//! is on, as on the local stack: without it Nagle's algorithm holds back every PUBACK of a
//! burst but the first until the client's delayed ACK, about 40 ms.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use tempfile::TempDir;

use crate::logs::{data_dir, instance_dir};
use crate::process::{
    binary, command, free_port, is_root, retry_on_address_in_use, write_file, Process,
    READY_TIMEOUT,
};
use crate::Error;

const HOST: &str = "127.0.0.1";

const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A Mosquitto process, stopped and deleted when dropped.
#[derive(Debug)]
pub struct Mosquitto {
    /// Kept across restarts so clients reconnect to the same address.
    port: u16,
    /// Resolved once, so a restart cannot pick up a different binary.
    binary: PathBuf,
    /// mosquitto.conf, written once; restarts reuse it (and the persistence file next to it).
    config: PathBuf,
    process: Process,
    /// Owns the config and persistence file; declared last so it is removed after the process
    /// stops.
    dir: TempDir,
}

impl Mosquitto {
    /// Starts Mosquitto on a free port with anonymous access and persistence, returning once it
    /// answers an MQTT CONNECT.
    pub fn start() -> Result<Mosquitto, Error> {
        Self::start_with_config("")
    }

    /// Like `start`, with `extra_conf` appended to the generated mosquitto.conf (e.g.
    /// `password_file` and `acl_file` lines). Later lines override earlier ones, so
    /// `allow_anonymous false` works; `per_listener_settings` does not, as it must come first.
    pub fn start_with_config(extra_conf: &str) -> Result<Mosquitto, Error> {
        retry_on_address_in_use(|| Self::start_on_free_port(extra_conf))
    }

    fn start_on_free_port(extra_conf: &str) -> Result<Mosquitto, Error> {
        let binary = binary(
            "mosquitto",
            "TEST_MOSQUITTO",
            "/usr/sbin/mosquitto",
            "sudo apt-get install -y mosquitto",
        )?;
        let dir = data_dir("mosquitto")?;
        let port = free_port()?;
        let config = dir.path().join("mosquitto.conf");
        write_file(&config, config_text(port, dir.path(), extra_conf))?;
        let log = instance_dir("mosquitto")?.join("mosquitto.log");
        let mosquitto = Mosquitto {
            port,
            binary,
            config,
            process: Process::new(format!("mosquitto on port {port}"), log),
            dir,
        };
        mosquitto.launch()?;
        Ok(mosquitto)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Always "127.0.0.1"; a method so callers do not hard-code it.
    pub fn host(&self) -> &str {
        HOST
    }

    /// Stops the broker cleanly (SIGTERM), which also saves its persistence file.
    pub fn stop(&self) {
        self.process.stop(libc::SIGTERM, Duration::from_secs(10));
    }

    /// Starts the broker again on the same port, reloading what it persisted at the last clean
    /// stop; does nothing if it is running.
    pub fn start_again(&self) -> Result<(), Error> {
        self.launch()
    }

    /// Kills the broker with SIGKILL; whatever it received since its last clean stop is lost,
    /// as in a real crash.
    pub fn kill9(&self) {
        self.process.kill9();
    }

    pub(crate) fn shutdown(&self) {
        self.stop();
        let _ = std::fs::remove_dir_all(self.dir.path());
    }

    fn launch(&self) -> Result<(), Error> {
        let mut command = command(&self.binary, self.dir.path());
        command.arg("-c").arg(&self.config);
        self.process.launch(command)?;
        let address = SocketAddr::from(([127, 0, 0, 1], self.port));
        self.process
            .wait_ready(READY_TIMEOUT, || mqtt_connect(address))
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

fn config_text(port: u16, dir: &std::path::Path, extra_conf: &str) -> String {
    // As root Mosquitto switches to the `mosquitto` user, which could not write our temp dir.
    let user = if is_root() { "user root\n" } else { "" };
    format!(
        "\
{user}listener {port} {HOST}
allow_anonymous true
persistence true
persistence_location {dir}/
persistence_file mosquitto.db
max_queued_messages 100000000
max_queued_bytes 0
max_inflight_messages 100
max_packet_size 921600
set_tcp_nodelay true
log_dest stderr
log_type error
log_type warning
log_type notice
log_type information
connection_messages true
log_timestamp_format %Y-%m-%dT%H:%M:%S
{extra_conf}
",
        dir = dir.display()
    )
}

/// One MQTT 3.1.1 CONNECT/CONNACK exchange. Any CONNACK counts, even a refusal: a broker that
/// refuses an anonymous client (e.g. with a password file) is still up.
fn mqtt_connect(address: SocketAddr) -> Result<(), String> {
    const CLIENT_ID: &[u8] = b"test-servers-probe";
    let mut stream = TcpStream::connect_timeout(&address, PROBE_TIMEOUT)
        .map_err(|error| format!("tcp connect to {address}: {error}"))?;
    stream
        .set_read_timeout(Some(PROBE_TIMEOUT))
        .map_err(|error| error.to_string())?;
    let mut packet = vec![0x10, (12 + CLIENT_ID.len()) as u8];
    // Protocol "MQTT", level 4 (3.1.1), clean session, keep-alive 10 s.
    packet.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 10]);
    packet.extend_from_slice(&[0, CLIENT_ID.len() as u8]);
    packet.extend_from_slice(CLIENT_ID);
    stream
        .write_all(&packet)
        .map_err(|error| format!("sending CONNECT to {address}: {error}"))?;
    let mut connack = [0u8; 4];
    stream
        .read_exact(&mut connack)
        .map_err(|error| format!("waiting for CONNACK from {address}: {error}"))?;
    if connack[0] != 0x20 {
        return Err(format!(
            "{address} answered CONNECT with packet type {:#04x}",
            connack[0]
        ));
    }
    let _ = stream.write_all(&[0xE0, 0]);
    Ok(())
}
