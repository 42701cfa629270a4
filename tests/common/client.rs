//! A minimal SMTP client for tests that need to see exactly which
//! messages were acknowledged.

use std::net::SocketAddr;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// One SMTP session.
pub struct Client {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Client {
    /// Connect, read the greeting and say EHLO.
    pub async fn connect(addr: SocketAddr) -> std::io::Result<Client> {
        let (r, w) = TcpStream::connect(addr).await?.into_split();
        let mut c = Client {
            reader: BufReader::new(r),
            writer: w,
        };
        expect(c.reply().await?, '2')?;
        expect(c.command("EHLO test.example\r\n").await?, '2')?;
        Ok(c)
    }

    /// Read one (possibly multi-line) reply.
    pub async fn reply(&mut self) -> std::io::Result<String> {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line).await? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed",
                ));
            }
            all.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return Ok(all);
            }
        }
    }

    /// Send raw bytes and read one reply.
    pub async fn command(&mut self, line: &str) -> std::io::Result<String> {
        self.writer.write_all(line.as_bytes()).await?;
        self.reply().await
    }

    /// Send one message; Ok(final reply) whatever its code.
    pub async fn send(&mut self, from: &str, to: &[&str], body: &str) -> std::io::Result<String> {
        let r = self.command(&format!("MAIL FROM:<{from}>\r\n")).await?;
        if !r.starts_with('2') {
            return Ok(r);
        }
        for t in to {
            self.command(&format!("RCPT TO:<{t}>\r\n")).await?;
        }
        let r = self.command("DATA\r\n").await?;
        if !r.starts_with("354") {
            return Ok(r);
        }
        self.writer.write_all(body.as_bytes()).await?;
        self.command("\r\n.\r\n").await
    }
}

fn expect(reply: String, class: char) -> std::io::Result<()> {
    if reply.starts_with(class) {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("unexpected reply {reply:?}")))
    }
}
