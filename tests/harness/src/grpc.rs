//! A gRPC "sandbox" (`sandboxgateway.test.v1.Echo`, proto/echo.proto): a real tonic server over
//! h2c, as a sandbox would run one, and a tonic client that names its sandbox with the
//! `x-sandbox-id` metadata header (and, with [`client_with_token`], a token header). Used by the
//! end-to-end tests of gRPC through the gateway; [`crate::sandbox::SandboxServer`] serves the
//! same service on its one port.

use anyhow::{Context, Result};
use std::net::SocketAddr;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::metadata::{Ascii, MetadataKey, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};

pub mod pb {
    tonic::include_proto!("sandboxgateway.test.v1");
}

use pb::echo_client::EchoClient;
use pb::echo_server::{Echo, EchoServer};
use pb::{EchoReply, EchoRequest, StreamRequest};

struct Service {
    name: String,
}

#[tonic::async_trait]
impl Echo for Service {
    async fn unary(&self, req: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let message = req.into_inner().message;
        if message == "fail" {
            return Err(Status::failed_precondition("the sandbox refused: fail"));
        }
        Ok(Response::new(EchoReply {
            message,
            sandbox: self.name.clone(),
            index: 0,
        }))
    }

    type StreamStream = ReceiverStream<Result<EchoReply, Status>>;

    async fn stream(
        &self,
        req: Request<StreamRequest>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let r = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let name = self.name.clone();
        tokio::spawn(async move {
            for index in 0..r.count {
                let reply = EchoReply {
                    message: format!("reply {index}"),
                    sandbox: name.clone(),
                    index,
                };
                if tx.send(Ok(reply)).await.is_err() {
                    return;
                }
            }
            // After the data, so the status travels in real trailers, not a trailers-only reply.
            if r.fail_code != 0 {
                let _ = tx
                    .send(Err(Status::new(Code::from(r.fail_code), r.fail_message)))
                    .await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// The Echo service answering as `name`, ready to be driven as a tower service by another
/// server (the sandbox server's gRPC requests).
pub(crate) fn echo_routes(name: &str) -> tonic::service::Routes {
    tonic::service::Routes::new(EchoServer::new(Service { name: name.into() }))
}

/// A running gRPC sandbox; dropping it stops the server.
pub struct GrpcSandbox {
    pub addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

impl GrpcSandbox {
    /// Binds `bind` (port 0: any free port) and serves h2c in the background.
    pub async fn start(name: &str, bind: SocketAddr) -> Result<GrpcSandbox> {
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let svc = EchoServer::new(Service { name: name.into() });
        tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "gRPC sandbox stopped");
            }
        });
        Ok(GrpcSandbox { addr, _stop: stop })
    }
}

/// Adds `x-sandbox-id`, and the token header when there is one, to every call.
#[derive(Clone)]
pub struct SandboxId {
    id: MetadataValue<Ascii>,
    token: Option<(MetadataKey<Ascii>, MetadataValue<Ascii>)>,
}

impl tonic::service::Interceptor for SandboxId {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("x-sandbox-id", self.id.clone());
        if let Some((header, token)) = &self.token {
            req.metadata_mut().insert(header.clone(), token.clone());
        }
        Ok(req)
    }
}

pub type Client = EchoClient<InterceptedService<Channel, SandboxId>>;

/// A client of the Echo service through the gateway at `gateway`, for `sandbox_id`.
pub async fn client(gateway: SocketAddr, sandbox_id: &str) -> Result<Client> {
    connect(gateway, sandbox_id, None).await
}

/// Like [`client`], and every call also carries `token_header: token` (e.g. a sandbox's access
/// token for a route that wants one).
pub async fn client_with_token(
    gateway: SocketAddr,
    sandbox_id: &str,
    token_header: &str,
    token: &str,
) -> Result<Client> {
    let header = MetadataKey::from_bytes(token_header.as_bytes())
        .with_context(|| format!("{token_header:?} as an ASCII metadata key"))?;
    let token = token
        .parse()
        .with_context(|| format!("the token for {token_header:?} as a metadata value"))?;
    connect(gateway, sandbox_id, Some((header, token))).await
}

async fn connect(
    gateway: SocketAddr,
    sandbox_id: &str,
    token: Option<(MetadataKey<Ascii>, MetadataValue<Ascii>)>,
) -> Result<Client> {
    let id = sandbox_id
        .parse()
        .with_context(|| format!("{sandbox_id:?} as a metadata value"))?;
    let channel = Endpoint::from_shared(format!("http://{gateway}"))?
        .connect()
        .await
        .with_context(|| format!("connecting to the gateway at {gateway}"))?;
    Ok(EchoClient::with_interceptor(
        channel,
        SandboxId { id, token },
    ))
}

pub use pb::{EchoReply as Reply, EchoRequest as UnaryRequest, StreamRequest as StreamCall};

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    /// An h2 server that hands each request's headers to the test and refuses the call.
    async fn header_catcher() -> (SocketAddr, tokio::sync::mpsc::Receiver<hyper::HeaderMap>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let svc = hyper::service::service_fn(move |req: hyper::Request<_>| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(req.headers().clone()).await;
                    // A trailers-only gRPC reply: UNIMPLEMENTED.
                    hyper::Response::builder()
                        .header("content-type", "application/grpc")
                        .header("grpc-status", "12")
                        .body(http_body_util::Empty::<bytes::Bytes>::new())
                }
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
        (addr, rx)
    }

    #[tokio::test]
    async fn client_with_token_sends_the_id_and_the_token() {
        let (addr, mut headers) = header_catcher().await;
        let mut c = client_with_token(addr, "sb-1", "X-Sandbox-Token", "s3cret")
            .await
            .unwrap();
        let err = c
            .unary(UnaryRequest {
                message: "hi".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unimplemented);
        let h = headers.recv().await.unwrap();
        assert_eq!(h["x-sandbox-id"], "sb-1");
        assert_eq!(h["x-sandbox-token"], "s3cret");
    }

    #[tokio::test]
    async fn client_with_token_refuses_bad_headers_before_connecting() {
        // Nothing listens on port 1; the refusal comes first.
        let nowhere: SocketAddr = "127.0.0.1:1".parse().unwrap();
        for (header, token) in [
            ("bad header", "t"),
            ("x-token-bin", "t"),
            ("x-token", "a\nb"),
        ] {
            let err = client_with_token(nowhere, "sb-1", header, token)
                .await
                .err()
                .unwrap();
            assert!(
                !format!("{err:#}").contains("connecting"),
                "{header}: {err:#}"
            );
        }
    }
}
