// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";

/// @notice The EIP-3009 entry point the collector uses (FiatToken v2.2 / TestUSDC, bytes signature).
interface IERC3009Receive {
    function receiveWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes memory signature
    ) external;
}

/// @title ERC3009DepositCollector (local test implementation)
/// @notice Deposit collector for the x402 `batch-settlement` scheme: the payer signs an EIP-3009
/// ReceiveWithAuthorization to this collector whose nonce is keccak256(abi.encode(channelId, salt)),
/// so the authorization can fund that one channel only. collectorData (built by the SDK's
/// `build_erc3009_collector_data`) = abi.encode(uint256 validAfter, uint256 validBefore, uint256 salt,
/// bytes signature). Placed at the SDK's ERC3009_DEPOSIT_COLLECTOR_ADDRESS with `anvil_setCode`.
contract ERC3009DepositCollector {
    using SafeERC20 for IERC20;

    /// @dev The SDK's BATCH_SETTLEMENT_ADDRESS (the only caller allowed).
    address public constant BATCH_SETTLEMENT = 0x4020074e9dF2ce1deE5A9C1b5c3f541D02a10003;

    error OnlyBatchSettlement();

    function collect(address payer, address token, uint256 amount, bytes32 channelId, bytes calldata collectorData)
        external
    {
        if (msg.sender != BATCH_SETTLEMENT) revert OnlyBatchSettlement();
        (uint256 validAfter, uint256 validBefore, uint256 salt, bytes memory signature) =
            abi.decode(collectorData, (uint256, uint256, uint256, bytes));
        bytes32 nonce = keccak256(abi.encode(channelId, salt));
        IERC3009Receive(token).receiveWithAuthorization(
            payer, address(this), amount, validAfter, validBefore, nonce, signature
        );
        IERC20(token).safeTransfer(BATCH_SETTLEMENT, amount);
    }
}
