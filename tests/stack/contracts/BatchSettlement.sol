// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {SignatureChecker} from "@openzeppelin/contracts/utils/cryptography/SignatureChecker.sol";

/// @notice What a deposit collector does for `BatchSettlement.deposit`: move exactly `amount` of
/// `token` from `payer` to the BatchSettlement contract, authorised by `collectorData` for `channelId`.
interface IDepositCollector {
    function collect(address payer, address token, uint256 amount, bytes32 channelId, bytes calldata collectorData)
        external;
}

/// @title BatchSettlement (local test implementation)
/// @notice Payment channels for the x402 `batch-settlement` scheme, written for the local test chain
/// against the ABI and semantics the PyPI `x402` SDK (2.25, `x402.mechanisms.evm.batch_settlement`)
/// uses. The stack places its runtime code at the SDK's CREATE2 address with `anvil_setCode`, so it
/// has no constructor, no immutables and no initialised storage: the EIP-712 domain is computed from
/// `block.chainid` and `address(this)` on every use.
///
/// Accounting per channel (channelId = EIP-712 digest of its ChannelConfig):
///   balance      = deposited - refunded - withdrawn (claimed money stays inside `balance`)
///   totalClaimed = the highest cumulative amount the receiver has claimed, <= balance
/// Claims move money from the channel to the receiver's account here (`receivers`); `settle` pays
/// that account out. A refund or a finished withdrawal pays `balance - totalClaimed` (or less) back.
contract BatchSettlement {
    using SafeERC20 for IERC20;

    struct ChannelConfig {
        address payer;
        address payerAuthorizer; // signs vouchers; zero = the payer itself, checked with ERC-1271/ECDSA
        address receiver;
        address receiverAuthorizer; // signs claim batches and refunds
        address token;
        uint40 withdrawDelay;
        bytes32 salt;
    }

    struct Voucher {
        ChannelConfig channel;
        uint128 maxClaimableAmount;
    }

    struct VoucherClaim {
        Voucher voucher;
        bytes signature; // the payer side's signature over Voucher(channelId, maxClaimableAmount)
        uint128 totalClaimed; // the cumulative amount claimed by this entry, <= maxClaimableAmount
    }

    struct ChannelState {
        uint128 balance;
        uint128 totalClaimed;
    }

    struct PendingWithdrawal {
        uint128 amount;
        uint40 initiatedAt;
    }

    struct ReceiverState {
        uint128 totalClaimed;
        uint128 totalSettled;
    }

    uint40 public constant MIN_WITHDRAW_DELAY = 900;
    uint40 public constant MAX_WITHDRAW_DELAY = 2_592_000;

    bytes32 private constant DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)");
    bytes32 private constant NAME_HASH = keccak256("x402 Batch Settlement");
    bytes32 private constant VERSION_HASH = keccak256("1");
    bytes32 public constant CHANNEL_CONFIG_TYPEHASH = keccak256(
        "ChannelConfig(address payer,address payerAuthorizer,address receiver,address receiverAuthorizer,address token,uint40 withdrawDelay,bytes32 salt)"
    );
    bytes32 public constant VOUCHER_TYPEHASH = keccak256("Voucher(bytes32 channelId,uint128 maxClaimableAmount)");
    bytes32 public constant REFUND_TYPEHASH = keccak256("Refund(bytes32 channelId,uint256 nonce,uint128 amount)");
    bytes32 public constant CLAIM_ENTRY_TYPEHASH =
        keccak256("ClaimEntry(bytes32 channelId,uint128 maxClaimableAmount,uint128 totalClaimed)");
    bytes32 public constant CLAIM_BATCH_TYPEHASH = keccak256(
        "ClaimBatch(ClaimEntry[] claims)ClaimEntry(bytes32 channelId,uint128 maxClaimableAmount,uint128 totalClaimed)"
    );

    mapping(bytes32 channelId => ChannelState) public channels;
    mapping(bytes32 channelId => PendingWithdrawal) public pendingWithdrawals;
    mapping(address receiver => mapping(address token => ReceiverState)) public receivers;
    mapping(bytes32 channelId => uint256) public refundNonce;

    uint256 private _entered;

    event Deposited(bytes32 indexed channelId, address indexed payer, address indexed collector, uint128 amount);
    event Claimed(bytes32 indexed channelId, address indexed receiver, uint128 amount, uint128 totalClaimed);
    event Settled(address indexed receiver, address indexed token, address indexed sender, uint128 amount);
    event Refunded(bytes32 indexed channelId, address indexed payer, uint128 amount, uint256 nonce);
    event WithdrawInitiated(bytes32 indexed channelId, uint128 amount, uint40 initiatedAt);
    event WithdrawFinalized(bytes32 indexed channelId, address indexed payer, uint128 amount);

    error Reentrancy();
    error InvalidAmount();
    error InvalidWithdrawDelay();
    error InvalidConfig();
    error CollectorShortfall(uint256 expected, uint256 received);
    error Unauthorized();
    error InvalidVoucherSignature(bytes32 channelId);
    error InvalidAuthorizerSignature();
    error ClaimAboveVoucher(bytes32 channelId);
    error ClaimAboveBalance(bytes32 channelId);
    error NothingToSettle();
    error NothingToRefund();
    error InvalidRefundNonce(uint256 expected, uint256 given);
    error WithdrawPending();
    error NoWithdrawPending();
    error WithdrawDelayNotElapsed(uint256 readyAt);
    error EmptyBatch();

    modifier nonReentrant() {
        if (_entered != 0) revert Reentrancy();
        _entered = 1;
        _;
        _entered = 0;
    }

    // ------------------------------------------------------------------ batching

    /// @notice Runs each call against this contract in order, as one transaction (the facilitator
    /// batches claimWithSignature + refundWithSignature this way). Any failure reverts the whole batch.
    function multicall(bytes[] calldata data) external returns (bytes[] memory results) {
        results = new bytes[](data.length);
        for (uint256 i = 0; i < data.length; i++) {
            (bool ok, bytes memory ret) = address(this).delegatecall(data[i]);
            if (!ok) {
                assembly ("memory-safe") {
                    revert(add(ret, 32), mload(ret))
                }
            }
            results[i] = ret;
        }
    }

    // ------------------------------------------------------------------ deposit

    /// @notice Adds `amount` to the channel of `config`, pulled by `collector` with `collectorData`.
    /// Anyone may submit it (the facilitator pays the gas); the payer's consent is in collectorData.
    function deposit(ChannelConfig calldata config, uint128 amount, address collector, bytes calldata collectorData)
        external
        nonReentrant
    {
        if (amount == 0) revert InvalidAmount();
        if (config.withdrawDelay < MIN_WITHDRAW_DELAY || config.withdrawDelay > MAX_WITHDRAW_DELAY) {
            revert InvalidWithdrawDelay();
        }
        if (
            config.payer == address(0) || config.receiver == address(0) || config.receiverAuthorizer == address(0)
                || config.token == address(0)
        ) revert InvalidConfig();
        bytes32 channelId = getChannelId(config);
        IERC20 token = IERC20(config.token);
        uint256 before = token.balanceOf(address(this));
        IDepositCollector(collector).collect(config.payer, config.token, amount, channelId, collectorData);
        uint256 received = token.balanceOf(address(this)) - before;
        if (received != amount) revert CollectorShortfall(amount, received);
        channels[channelId].balance += amount;
        emit Deposited(channelId, config.payer, collector, amount);
    }

    // ------------------------------------------------------------------ claims

    /// @notice Claims vouchers; the caller must be each channel's receiver or receiverAuthorizer.
    function claim(VoucherClaim[] calldata voucherClaims) external nonReentrant {
        if (voucherClaims.length == 0) revert EmptyBatch();
        for (uint256 i = 0; i < voucherClaims.length; i++) {
            ChannelConfig calldata cfg = voucherClaims[i].voucher.channel;
            if (msg.sender != cfg.receiver && msg.sender != cfg.receiverAuthorizer) revert Unauthorized();
            _applyClaim(voucherClaims[i]);
        }
    }

    /// @notice Claims vouchers on the strength of one ClaimBatch signature by every entry's
    /// receiverAuthorizer, so anyone (the facilitator) may submit them.
    function claimWithSignature(VoucherClaim[] calldata voucherClaims, bytes calldata authorizerSignature)
        external
        nonReentrant
    {
        if (voucherClaims.length == 0) revert EmptyBatch();
        bytes32 digest = getClaimBatchDigest(voucherClaims);
        address checked;
        for (uint256 i = 0; i < voucherClaims.length; i++) {
            address authorizer = voucherClaims[i].voucher.channel.receiverAuthorizer;
            if (authorizer != checked) {
                if (!SignatureChecker.isValidSignatureNow(authorizer, digest, authorizerSignature)) {
                    revert InvalidAuthorizerSignature();
                }
                checked = authorizer;
            }
            _applyClaim(voucherClaims[i]);
        }
    }

    /// @dev An entry at or below what is already claimed changes nothing (claims are cumulative, so
    /// replaying one is harmless and a refund batch may carry an already-claimed voucher).
    function _applyClaim(VoucherClaim calldata c) private {
        ChannelConfig calldata cfg = c.voucher.channel;
        bytes32 channelId = getChannelId(cfg);
        ChannelState storage ch = channels[channelId];
        if (c.totalClaimed <= ch.totalClaimed) return;
        if (c.totalClaimed > c.voucher.maxClaimableAmount) revert ClaimAboveVoucher(channelId);
        if (c.totalClaimed > ch.balance) revert ClaimAboveBalance(channelId);
        if (!_validVoucherSignature(cfg, channelId, c.voucher.maxClaimableAmount, c.signature)) {
            revert InvalidVoucherSignature(channelId);
        }
        uint128 delta = c.totalClaimed - ch.totalClaimed;
        ch.totalClaimed = c.totalClaimed;
        receivers[cfg.receiver][cfg.token].totalClaimed += delta;
        emit Claimed(channelId, cfg.receiver, delta, c.totalClaimed);
    }

    function _validVoucherSignature(
        ChannelConfig calldata cfg,
        bytes32 channelId,
        uint128 maxClaimableAmount,
        bytes calldata signature
    ) private view returns (bool) {
        bytes32 digest = getVoucherDigest(channelId, maxClaimableAmount);
        if (cfg.payerAuthorizer != address(0)) {
            (address recovered, ECDSA.RecoverError err,) = ECDSA.tryRecoverCalldata(digest, signature);
            return err == ECDSA.RecoverError.NoError && recovered == cfg.payerAuthorizer;
        }
        return SignatureChecker.isValidSignatureNowCalldata(cfg.payer, digest, signature);
    }

    // ------------------------------------------------------------------ settle

    /// @notice Pays out everything claimed for (receiver, token) and not yet paid. Anyone may call.
    function settle(address receiver, address token) external nonReentrant {
        ReceiverState storage r = receivers[receiver][token];
        uint128 amount = r.totalClaimed - r.totalSettled;
        if (amount == 0) revert NothingToSettle();
        r.totalSettled = r.totalClaimed;
        IERC20(token).safeTransfer(receiver, amount);
        emit Settled(receiver, token, msg.sender, amount);
    }

    // ------------------------------------------------------------------ refunds

    /// @notice The receiver side gives back up to `amount` of the unclaimed balance.
    function refund(ChannelConfig calldata config, uint128 amount) external nonReentrant {
        if (msg.sender != config.receiver && msg.sender != config.receiverAuthorizer) revert Unauthorized();
        bytes32 channelId = getChannelId(config);
        _refund(channelId, config, amount, refundNonce[channelId]);
    }

    /// @notice A refund of up to `amount` authorised by the receiverAuthorizer's signature over
    /// Refund(channelId, nonce, amount); `nonce` must be the channel's current refundNonce.
    function refundWithSignature(
        ChannelConfig calldata config,
        uint128 amount,
        uint256 nonce,
        bytes calldata receiverAuthorizerSignature
    ) external nonReentrant {
        bytes32 channelId = getChannelId(config);
        uint256 expected = refundNonce[channelId];
        if (nonce != expected) revert InvalidRefundNonce(expected, nonce);
        bytes32 digest = getRefundDigest(channelId, nonce, amount);
        if (!SignatureChecker.isValidSignatureNowCalldata(config.receiverAuthorizer, digest, receiverAuthorizerSignature))
        {
            revert InvalidAuthorizerSignature();
        }
        _refund(channelId, config, amount, nonce);
    }

    /// @dev Pays min(amount, balance - totalClaimed) to the payer, consumes the refund nonce and
    /// cancels a pending withdrawal (the payer has what it asked for, or the channel goes on).
    function _refund(bytes32 channelId, ChannelConfig calldata config, uint128 amount, uint256 nonce) private {
        if (amount == 0) revert InvalidAmount();
        ChannelState storage ch = channels[channelId];
        uint128 available = ch.balance - ch.totalClaimed;
        uint128 actual = amount < available ? amount : available;
        if (actual == 0) revert NothingToRefund();
        ch.balance -= actual;
        refundNonce[channelId] = nonce + 1;
        delete pendingWithdrawals[channelId];
        IERC20(config.token).safeTransfer(config.payer, actual);
        emit Refunded(channelId, config.payer, actual, nonce);
    }

    // ------------------------------------------------------------------ unilateral exit

    /// @notice The payer starts taking back up to `amount`; the receiver may still claim vouchers
    /// until `finalizeWithdraw` is possible, `withdrawDelay` seconds later.
    function initiateWithdraw(ChannelConfig calldata config, uint128 amount) external nonReentrant {
        if (msg.sender != config.payer && (config.payerAuthorizer == address(0) || msg.sender != config.payerAuthorizer))
        {
            revert Unauthorized();
        }
        if (amount == 0) revert InvalidAmount();
        bytes32 channelId = getChannelId(config);
        if (channels[channelId].balance == 0) revert NothingToRefund();
        if (pendingWithdrawals[channelId].initiatedAt != 0) revert WithdrawPending();
        uint40 now40 = uint40(block.timestamp);
        pendingWithdrawals[channelId] = PendingWithdrawal(amount, now40);
        emit WithdrawInitiated(channelId, amount, now40);
    }

    /// @notice Completes a withdrawal once its delay has passed; pays the payer. Anyone may call.
    function finalizeWithdraw(ChannelConfig calldata config) external nonReentrant {
        bytes32 channelId = getChannelId(config);
        PendingWithdrawal memory pw = pendingWithdrawals[channelId];
        if (pw.initiatedAt == 0) revert NoWithdrawPending();
        uint256 readyAt = uint256(pw.initiatedAt) + config.withdrawDelay;
        if (block.timestamp < readyAt) revert WithdrawDelayNotElapsed(readyAt);
        delete pendingWithdrawals[channelId];
        ChannelState storage ch = channels[channelId];
        uint128 available = ch.balance - ch.totalClaimed;
        uint128 actual = pw.amount < available ? pw.amount : available;
        ch.balance -= actual;
        if (actual > 0) IERC20(config.token).safeTransfer(config.payer, actual);
        emit WithdrawFinalized(channelId, config.payer, actual);
    }

    // ------------------------------------------------------------------ EIP-712 views

    function domainSeparator() public view returns (bytes32) {
        return keccak256(abi.encode(DOMAIN_TYPEHASH, NAME_HASH, VERSION_HASH, block.chainid, address(this)));
    }

    function _digest(bytes32 structHash) private view returns (bytes32) {
        return keccak256(abi.encodePacked(hex"1901", domainSeparator(), structHash));
    }

    /// @notice The channel id: the EIP-712 digest of the ChannelConfig (bound to chain and contract).
    function getChannelId(ChannelConfig calldata config) public view returns (bytes32) {
        return _digest(
            keccak256(
                abi.encode(
                    CHANNEL_CONFIG_TYPEHASH,
                    config.payer,
                    config.payerAuthorizer,
                    config.receiver,
                    config.receiverAuthorizer,
                    config.token,
                    config.withdrawDelay,
                    config.salt
                )
            )
        );
    }

    function getVoucherDigest(bytes32 channelId, uint128 maxClaimableAmount) public view returns (bytes32) {
        return _digest(keccak256(abi.encode(VOUCHER_TYPEHASH, channelId, maxClaimableAmount)));
    }

    function getRefundDigest(bytes32 channelId, uint256 nonce, uint128 amount) public view returns (bytes32) {
        return _digest(keccak256(abi.encode(REFUND_TYPEHASH, channelId, nonce, amount)));
    }

    function getClaimBatchDigest(VoucherClaim[] calldata voucherClaims) public view returns (bytes32) {
        bytes32[] memory entries = new bytes32[](voucherClaims.length);
        for (uint256 i = 0; i < voucherClaims.length; i++) {
            entries[i] = keccak256(
                abi.encode(
                    CLAIM_ENTRY_TYPEHASH,
                    getChannelId(voucherClaims[i].voucher.channel),
                    voucherClaims[i].voucher.maxClaimableAmount,
                    voucherClaims[i].totalClaimed
                )
            );
        }
        return _digest(keccak256(abi.encode(CLAIM_BATCH_TYPEHASH, keccak256(abi.encodePacked(entries)))));
    }
}
