//! A gRPC "sandbox" (`sandboxgateway.test.v1.Echo`, proto/echo.proto): a real tonic server over
//! h2c, as a sandbox would run one, and a tonic client that names its sandbox with the
//! `x-sandbox-id` metadata header. Used by the end-to-end tests of gRPC through the gateway.

use anyhow::{Context, Result};
use std::net::SocketAddr;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
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

/// Adds `x-sandbox-id` to every call.
#[derive(Clone)]
pub struct SandboxId(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for SandboxId {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("x-sandbox-id", self.0.clone());
        Ok(req)
    }
}

pub type Client = EchoClient<InterceptedService<Channel, SandboxId>>;

/// A client of the Echo service through the gateway at `gateway`, for `sandbox_id`.
pub async fn client(gateway: SocketAddr, sandbox_id: &str) -> Result<Client> {
    let channel = Endpoint::from_shared(format!("http://{gateway}"))?
        .connect()
        .await
        .with_context(|| format!("connecting to the gateway at {gateway}"))?;
    let id = sandbox_id
        .parse()
        .with_context(|| format!("{sandbox_id:?} as a metadata value"))?;
    Ok(EchoClient::with_interceptor(channel, SandboxId(id)))
}

pub use pb::{EchoReply as Reply, EchoRequest as UnaryRequest, StreamRequest as StreamCall};
