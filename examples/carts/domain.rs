//! The shopping-cart domain: events, commands, state, `decide` and `evolve`.
//! Nothing here knows about databases.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What happened to a cart.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", content = "data")]
pub enum CartEvent {
    CartCreated { currency: String },
    ItemAddedToCart { sku: String, quantity: u32, unit_price: i64 },
    ItemRemovedFromCart { sku: String, quantity: u32 },
    CartEmptied,
    CartCheckedOut { order_id: String },
    CartCancelled { reason: String },
}

/// What a user asks of a cart.
#[derive(Debug, Clone)]
pub enum CartCommand {
    Create { currency: String },
    AddItem { sku: String, quantity: u32, unit_price: i64 },
    RemoveItem { sku: String, quantity: u32 },
    Empty,
    CheckOut { order_id: String },
    Cancel { reason: String },
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Status {
    #[default]
    New,
    Open,
    CheckedOut,
    Cancelled,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub quantity: u32,
    pub unit_price: i64,
}

/// A cart's state: what `evolve` folds, for the aggregate and the read model alike.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct Cart {
    pub status: Status,
    pub currency: String,
    pub items: BTreeMap<String, Line>,
    pub total: i64,
    pub order_id: Option<String>,
}

/// Why a command was refused.
#[derive(Debug, thiserror::Error)]
pub enum CartError {
    #[error("the cart already exists")]
    AlreadyExists,
    #[error("the cart does not exist")]
    NotFound,
    #[error("the cart is closed ({0:?})")]
    Closed(Status),
    #[error("the cart has no {0} to remove")]
    NotInCart(String),
    #[error("an empty cart cannot be checked out")]
    EmptyCart,
}

/// The domain's one and only fold.
pub fn evolve(mut cart: Cart, event: &CartEvent) -> Cart {
    match event {
        CartEvent::CartCreated { currency } => {
            cart.status = Status::Open;
            cart.currency = currency.clone();
        }
        CartEvent::ItemAddedToCart { sku, quantity, unit_price } => {
            let line = cart.items.entry(sku.clone()).or_insert(Line { quantity: 0, unit_price: *unit_price });
            line.quantity += quantity;
            cart.total += *quantity as i64 * unit_price;
        }
        CartEvent::ItemRemovedFromCart { sku, quantity } => {
            if let Some(line) = cart.items.get_mut(sku) {
                let removed = (*quantity).min(line.quantity);
                line.quantity -= removed;
                cart.total -= removed as i64 * line.unit_price;
                if line.quantity == 0 {
                    cart.items.remove(sku);
                }
            }
        }
        CartEvent::CartEmptied => {
            cart.items.clear();
            cart.total = 0;
        }
        CartEvent::CartCheckedOut { order_id } => {
            cart.status = Status::CheckedOut;
            cart.order_id = Some(order_id.clone());
        }
        CartEvent::CartCancelled { .. } => cart.status = Status::Cancelled,
    }
    cart
}

/// Decides what a command means for a cart in `state`.
pub fn decide(command: CartCommand, state: &Cart) -> Result<Vec<CartEvent>, CartError> {
    use CartCommand::*;
    match (state.status, command) {
        (Status::New, Create { currency }) => Ok(vec![CartEvent::CartCreated { currency }]),
        (Status::New, _) => Err(CartError::NotFound),
        (_, Create { .. }) => Err(CartError::AlreadyExists),
        (status @ (Status::CheckedOut | Status::Cancelled), _) => Err(CartError::Closed(status)),
        (Status::Open, AddItem { sku, quantity, unit_price }) => {
            Ok(vec![CartEvent::ItemAddedToCart { sku, quantity, unit_price }])
        }
        (Status::Open, RemoveItem { sku, quantity }) => match state.items.contains_key(&sku) {
            true => Ok(vec![CartEvent::ItemRemovedFromCart { sku, quantity }]),
            false => Err(CartError::NotInCart(sku)),
        },
        (Status::Open, Empty) => Ok(vec![CartEvent::CartEmptied]),
        (Status::Open, CheckOut { .. }) if state.items.is_empty() => Err(CartError::EmptyCart),
        (Status::Open, CheckOut { order_id }) => Ok(vec![CartEvent::CartCheckedOut { order_id }]),
        (Status::Open, Cancel { reason }) => Ok(vec![CartEvent::CartCancelled { reason }]),
    }
}
