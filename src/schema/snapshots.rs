//! `snapshots`: the state of snapshot projections, per read-model table and key set.

use sea_orm::entity::prelude::*;

/// A projection's state for one read-model row.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "snapshots")]
pub struct Model {
    /// The read model's table.
    #[sea_orm(primary_key, auto_increment = false)]
    pub readmodel_table_name: String,
    /// The keys of the row, encoded like the TypeScript `constructStreamId`.
    #[sea_orm(primary_key, auto_increment = false)]
    pub stream_id: String,
    /// Last stream position folded into the state.
    pub last_stream_position: i64,
    /// Last global position folded into the state.
    pub last_global_position: i64,
    /// The state as JSON.
    #[sea_orm(column_type = "JsonBinary")]
    pub snapshot: Json,
    /// The tenant whose events the state folds (`None` for rows written before the column was
    /// added, or by the TypeScript package); PostgreSQL's row-level security keys on it.
    pub partition: Option<String>,
}

/// No relations are declared.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

/// `INSERT INTO snapshots` naming every column in declaration order; add rows with `values_panic`.
pub(crate) fn insert_all_columns() -> sea_orm::sea_query::InsertStatement {
    let mut insert = sea_orm::sea_query::Query::insert();
    insert.into_table(Entity).columns([
        Column::ReadmodelTableName,
        Column::StreamId,
        Column::LastStreamPosition,
        Column::LastGlobalPosition,
        Column::Snapshot,
        Column::Partition,
    ]);
    insert
}
