//! A reactor: each checkout places an order — an `OrderPlaced` event in the stream
//! `order-<order id>` — appended in the same transaction as the reactor's checkpoint, so an order
//! is placed once per checkout whatever crashes in between (an outbox-like flow).

use emmett_seaorm::projection::{EventHandler, ProjectionContext, ProjectionRegistry};
use emmett_seaorm::{AppendOptions, Error, ExpectedVersion, ReadOptions, RecordedEvent};
use serde::{Deserialize, Serialize};

use crate::domain::{Cart, CartEvent, evolve};

/// What happened to an order.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", content = "data")]
pub enum OrderEvent {
    OrderPlaced { cart_id: String, currency: String, total: i64 },
}

/// Places an order for each checked-out cart.
pub struct PlaceOrders;

#[async_trait::async_trait]
impl EventHandler<CartEvent> for PlaceOrders {
    async fn handle(
        &self,
        ctx: &ProjectionContext<'_>,
        event: &RecordedEvent<CartEvent>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let CartEvent::CartCheckedOut { order_id } = &event.event else { return Ok(()) };
        // The cart as of the checkout, read in the reactor's transaction.
        let read = ReadOptions::default().partition(ctx.partition()).to(event.stream_position);
        let cart = ctx.store().aggregate_stream(&event.stream_id, evolve, Cart::default, read).await?.state;
        let placed =
            OrderEvent::OrderPlaced { cart_id: event.stream_id.clone(), currency: cart.currency, total: cart.total };
        let options = AppendOptions::default()
            .partition(ctx.partition())
            .stream_type("order")
            .expected(ExpectedVersion::NoStream);
        match ctx.store().append_to_stream(&format!("order-{order_id}"), [placed], options).await {
            // Placed by an earlier delivery of this checkout (a replay): nothing to do.
            Ok(_) | Err(Error::ExpectedVersionConflict { .. }) => Ok(()),
            Err(err) => Err(err.into()),
        }
    }
}

/// The reactor's registry: it handles checkouts only.
pub fn reactor() -> ProjectionRegistry<CartEvent> {
    ProjectionRegistry::new().on(["CartCheckedOut"], PlaceOrders)
}
